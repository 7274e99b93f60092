"""DTP: dynamic task prioritization (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, state_dtype

#: KPIs are clamped into [KPI_FLOOR, 1] so that ``log κ`` stays finite.
KPI_FLOOR = 1e-6


class DTP(LossWeightingMethod):
    """DTP: focal weighting of each task by a key performance indicator κ_k ∈ (0, 1).

    M. Guo, A. Haque, D.-A. Huang, S. Yeung, L. Fei-Fei, "Dynamic Task Prioritization
    for Multitask Learning", ECCV 2018.

    The training loss is ``Σ_k w_k L_k`` with ``w_k = -(1 - κ̄_k)^γ log κ̄_k`` (detached),
    where ``κ̄`` is the exponential moving average ``κ̄ ← α κ + (1 - α) κ̄`` of the KPIs
    (the paper's smoothing). Tasks with a low KPI (hard tasks) get large weights.

    KPIs: the paper uses a task metric (accuracy, ...). Feed yours with
    :meth:`update_kpis` (K values in (0, 1), e.g. once per validation round or per
    batch); they replace the default from then on. Without them the default KPI is
    ``κ_k = exp(-L_k)`` of the step's detached loss, a value in (0, 1] that is 1 for a
    solved task and falls as the loss grows. Before any KPI is known κ̄ = ½.

    Options (the paper's names): ``gamma=1.0`` (the focusing parameter γ),
    ``alpha=0.9`` (the smoothing factor α). State: κ̄ and whether the user feeds
    KPIs. Cost per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> dtp = selgroup_fast.methods.create("dtp", torch.optim.SGD(model.parameters(), lr=0.1), 2)
        >>> dtp.update_kpis([0.9, 0.5])      # e.g. accuracies: task 1 is the harder one
        >>> bool(dtp.weights[1] > dtp.weights[0])
        True
    """

    name = "dtp"
    saved_state = ("kpis", "user_kpis")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        gamma: float = 1.0,
        alpha: float = 0.9,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        dtype = state_dtype(optimizer)
        self.kpis = torch.full((num_tasks,), 0.5, device=self.device, dtype=dtype)
        self.user_kpis = False

    @property
    def weights(self) -> torch.Tensor:
        """The focal weights ``-(1 - κ̄)^γ log κ̄`` of the smoothed KPIs."""
        kpis = self.kpis.clamp(KPI_FLOOR, 1.0)
        return -((1.0 - kpis) ** self.gamma) * torch.log(kpis)

    def _smooth(self, kpis: torch.Tensor) -> None:
        self.kpis = self.alpha * kpis.to(self.kpis) + (1.0 - self.alpha) * self.kpis

    def update_kpis(self, kpis: torch.Tensor | Sequence[float]) -> None:
        """Feeds the K task KPIs (values in (0, 1); clamped) into the moving average."""
        kpis = torch.as_tensor(kpis, dtype=self.kpis.dtype).to(self.device)
        if kpis.shape != (self.num_tasks,):
            raise ValueError(f"expected {self.num_tasks} KPIs, got shape {tuple(kpis.shape)}")
        self._smooth(kpis.clamp(KPI_FLOOR, 1.0))
        self.user_kpis = True

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        if not self.user_kpis:
            self._smooth(torch.exp(-losses.detach()))
        return (self.weights.to(losses.dtype) * losses).sum()
