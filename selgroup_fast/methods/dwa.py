"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_int
from ..losses import ClosureOutput
from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, state_dtype


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
    counter, the running window sum and its count of steps, the last two window means (all
    on the device). A step skipped for a non-finite loss (``nonfinite="skip"``) adds nothing
    to its window, whose mean is over the steps it counted; a window of skipped steps only
    leaves the means as they were. Cost per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> dwa = selgroup_fast.methods.create("dwa", torch.optim.SGD(model.parameters(), lr=0.1), 2, window=1)
        >>> x = torch.randn(8, 4)
        >>> for _ in range(3):
        ...     losses = dwa.step(lambda: list(model(x).pow(2).mean(0)))
        >>> bool(torch.isclose(dwa.weights.sum(), torch.tensor(2.0)))  # the weights sum to K
        True
    """

    name = "dwa"
    saved_state = ("steps", "window_sum", "window_steps", "last_means", "older_means", "weights")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        temp: float = 2.0,
        window: int = 100,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if temp <= 0:
            raise ValueError(f"temp must be > 0, got {temp}")
        self.temp = float(temp)
        self.window = check_int("window", window)
        self.steps = 0
        dtype = state_dtype(optimizer)
        zeros = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        self.window_sum = zeros.clone()
        self.window_steps = torch.zeros((), device=self.device, dtype=dtype)  # the steps not skipped
        self.last_means = zeros.clone()  # L̄(t-1)
        self.older_means = zeros.clone()  # L̄(t-2)
        self._weights = torch.ones(num_tasks, device=self.device, dtype=dtype)

    @property
    def weights(self) -> torch.Tensor:
        """The K loss weights of the next step (1 during the first two windows)."""
        return self._weights

    @weights.setter
    def weights(self, weights: torch.Tensor) -> None:  # set by the window rule, a skipped step's restore, a checkpoint
        self._weights = weights

    def _state_kept_on_skip(self) -> list[str]:
        return []  # a skipped step is left out of its window by _after_step

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.weights.to(losses.dtype) * losses).sum()

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        with self._timer.phase("manipulation"):
            skip = self._nonfinite.skip
            losses = losses.to(self.window_sum.dtype)
            self.window_sum += losses if skip is None else torch.where(skip, 0.0, losses)
            self.window_steps += 1 if skip is None else (~skip).to(self.window_steps.dtype)
            self.steps += 1
            if self.steps % self.window:
                return
            counted = self.window_steps > 0
            means = torch.where(counted, self.window_sum / self.window_steps.clamp(min=1), self.last_means)
            self.older_means = torch.where(counted, self.last_means, self.older_means)
            self.last_means = means
            self.window_sum = torch.zeros_like(self.window_sum)
            self.window_steps = torch.zeros_like(self.window_steps)
            if self.steps >= 2 * self.window:
                ratios = self.last_means / self.older_means
                self.weights = self.num_tasks * torch.softmax(ratios / self.temp, dim=0)
