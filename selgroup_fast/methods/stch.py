"""STCH: smooth Tchebycheff scalarization (Lin, Zhang, Wu, Zhang & Zhang, ICML 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_int
from ..losses import ClosureOutput
from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, TaskValues, preference, reference_point, state_dtype

#: LibMTL's shift inside the logarithms of the warm-up and of the normalised losses.
LOG_SHIFT = 1e-20


def smooth_max(values: torch.Tensor, mu: float) -> torch.Tensor:
    """``μ log Σ_k exp(v_k / μ)``, the smooth maximum of ``values`` (``logsumexp`` shifts by the max: no overflow)."""
    return mu * torch.logsumexp(values / mu, dim=0)


class STCH(LossWeightingMethod):
    """STCH: the smooth Tchebycheff scalarization, a smooth weighted maximum of the task losses.

    X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization", ICML 2024 (arXiv 2402.19078).

    Two rules, as the two peers have them:

    * ``warmup=None`` (default): TorchJD's ``STCH(mu, weights, reference)``, the training loss
      ``μ log Σ_k exp(λ_k (L_k − z_k) / μ)`` with the preference ``λ`` (``weights``, default
      ``1/K``) and the ideal point ``z`` (``reference``, default 0).
    * ``warmup=W`` (an int >= 0): LibMTL's ``STCH`` with its warm-up, in windows of ``window``
      steps (LibMTL's epochs, as DWA's windows): the first ``W + 1`` windows train on
      ``Σ_k log(L_k + 1e-20)``; the mean loss over window ``W`` (the steps not skipped) is the
      nadir point ``n``; from then on the training loss is
      ``K μ log Σ_k exp(log(L_k / n_k + 1e-20) / μ)``. ``weights`` and ``reference`` are
      TorchJD's and are refused with ``warmup`` (LibMTL has neither).

    Options: ``mu=1.0`` (μ > 0; LibMTL's default ``STCH_mu``, TorchJD has none), ``weights=None``,
    ``reference=None``, ``warmup=None`` (LibMTL's ``STCH_warmup_epoch`` is 4 epochs), ``window=100``.
    State (on the device, in ``state_dict``): the step counter, the sum and count of the
    averaging window's losses, the nadir point (1 until it is known; it stays 1 if every step of
    the averaging window was skipped). Cost per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> stch = selgroup_fast.methods.create("stch", opt, 2, warmup=0, window=2)
        >>> x = torch.randn(8, 4)
        >>> for _ in range(3):
        ...     losses = stch.step(lambda: list(model(x).pow(2).mean(0)))
        >>> bool((stch.nadir != 1).all())  # the mean loss of steps 1-2, the nadir of step 3 on
        True
    """

    name = "stch"
    warmup_options = "warmup= or window="
    saved_state = ("steps", "nadir_sum", "nadir_steps", "nadir")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        mu: float = 1.0,
        weights: TaskValues | None = None,
        reference: TaskValues | None = None,
        warmup: int | None = None,
        window: int = 100,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if warmup is not None and (weights is not None or reference is not None):
            raise ValueError("weights= and reference= are TorchJD's STCH, warmup= is LibMTL's: give one or the other")
        self.mu = float(mu)
        self.warmup = None if warmup is None else check_int("warmup", warmup, minimum=0)
        self.window = check_int("window", window)
        # The steps on the log losses before the nadir point is known (MultiTaskMethod.warmup_steps).
        self.warmup_steps = 0 if self.warmup is None else (self.warmup + 1) * self.window
        dtype = state_dtype(optimizer)
        self.preference = preference(weights, num_tasks, self.device, dtype)
        self.reference = reference_point(reference, num_tasks, self.device, dtype)
        self.steps = 0
        self.nadir_sum = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        self.nadir_steps = torch.zeros((), device=self.device, dtype=dtype)  # the averaging window's steps not skipped
        self.nadir = torch.ones(num_tasks, device=self.device, dtype=dtype)

    def _state_kept_on_skip(self) -> list[str]:
        return []  # a skipped step is left out of the nadir's average by _after_step

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if self.warmup is None:
            weighted = self.preference.to(losses.dtype) * (losses - self.reference.to(losses.dtype))
            return smooth_max(weighted, self.mu)
        if self.steps < self.warmup_steps:
            return torch.log(losses + LOG_SHIFT).sum()
        return self.num_tasks * smooth_max(torch.log(losses / self.nadir.to(losses.dtype) + LOG_SHIFT), self.mu)

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        self.steps += 1
        if self.warmup is None or not self.warmup * self.window < self.steps <= self.warmup_steps:
            return
        with self._timer.phase("manipulation"):
            skip = self._nonfinite.skip
            losses = losses.to(self.nadir_sum.dtype)
            self.nadir_sum += losses if skip is None else torch.where(skip, 0.0, losses)
            self.nadir_steps += 1 if skip is None else (~skip).to(self.nadir_steps.dtype)
            if self.steps == self.warmup_steps:
                counted = self.nadir_steps > 0
                self.nadir = torch.where(counted, self.nadir_sum / self.nadir_steps.clamp(min=1), self.nadir)
