"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..checks import check_int
from ..losses import ClosureOutput
from .loss_weighting import LossWeightingMethod


class DWA(LossWeightingMethod):
    """DWA: each task weighted by how slowly its loss has been decreasing.

    S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (arXiv 1803.10704), Eq. 7; authors' code ``lorenmt/mtan``.

    ``w_k = K · softmax_k(r_k / temp)`` with ``r_k = L̄_k(t-1) / L̄_k(t-2)`` and the training
    loss ``Σ_k w_k L_k`` (the authors' sum). The authors average the losses over
    *epochs*; a step-based API has none, so here ``L̄(t)`` is the mean loss over the
    t-th *window* of ``window`` consecutive steps (non-overlapping). The weights change
    at window boundaries; during the first two windows they are 1 (the authors'
    first two epochs). ``window=1`` gives the per-step variant.

    Options (the authors' names): ``temp=2.0``, ``window=100``. State: the step
    counter, the running window sum and the last two window means (all on the
    device). Cost per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> dwa = selgroup_fast.methods.create("dwa", torch.optim.SGD(model.parameters(), lr=0.1), 2, window=1)
        >>> x = torch.randn(8, 4)
        >>> for _ in range(3):
        ...     losses = dwa.step(lambda: list(model(x).pow(2).mean(0)))
        >>> dwa.weights.sum()
        tensor(2.)
    """

    name = "dwa"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        temp: float = 2.0,
        window: int = 100,
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile)
        if temp <= 0:
            raise ValueError(f"temp must be > 0, got {temp}")
        self.temp = float(temp)
        self.window = check_int("window", window)
        self.steps = 0
        dtype = optimizer.param_groups[0]["params"][0].dtype
        zeros = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        self._window_sum = zeros.clone()
        self._last_means = zeros.clone()  # L̄(t-1)
        self._older_means = zeros.clone()  # L̄(t-2)
        self.weights = torch.ones(num_tasks, device=self.device, dtype=dtype)

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.weights.to(losses.dtype) * losses).sum()

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        with self._timer.phase("manipulation"):
            self._window_sum += losses.to(self._window_sum.dtype)
            self.steps += 1
            if self.steps % self.window:
                return
            self._older_means, self._last_means = self._last_means, self._window_sum / self.window
            self._window_sum = torch.zeros_like(self._window_sum)
            if self.steps >= 2 * self.window:
                ratios = self._last_means / self._older_means
                self.weights = self.num_tasks * torch.softmax(ratios / self.temp, dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "window_sum": self._window_sum.clone(),
            "last_means": self._last_means.clone(),
            "older_means": self._older_means.clone(),
            "weights": self.weights.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        like = self.weights
        self._window_sum = state_dict["window_sum"].to(like).clone()
        self._last_means = state_dict["last_means"].to(like).clone()
        self._older_means = state_dict["older_means"].to(like).clone()
        self.weights = state_dict["weights"].to(like).clone()
