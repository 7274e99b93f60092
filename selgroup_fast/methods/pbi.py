"""PBI: penalty-based boundary intersection (Zhang & Li, IEEE TEVC 2007)."""

from __future__ import annotations

import torch

from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, TaskValues, preference, reference_point, state_dtype

#: TorchJD's constant under the square root of ``d_2``: a finite gradient on the preference line.
D2_SHIFT = 1e-12


class PBI(LossWeightingMethod):
    """PBI: the distance along the preference direction plus θ times the distance to it.

    Q. Zhang, H. Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition",
    IEEE Transactions on Evolutionary Computation 11(6), 2007.

    With ``f = L − z`` (``z`` the ``reference`` point) and ``ŵ = w / ‖w‖`` (``w`` the
    preference, ``weights``): ``d_1 = fᵀŵ``, ``d_2 = √(‖f − d_1 ŵ‖² + 1e-12)`` and the
    training loss is ``d_1 + θ d_2`` (TorchJD's ``PBI``, its constant under the root included).
    The preference is fixed; see :class:`~selgroup_fast.methods.cosmos.COSMOS` on drawing it.

    Options: ``theta=5.0`` (θ >= 0; the paper's value, TorchJD has no default),
    ``weights=None`` (K numbers >= 0; default uniform), ``reference=None`` (K numbers, a
    lower bound of the losses; default 0). No state. Cost per step: 1 forward, 1 backward,
    1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> pbi = selgroup_fast.methods.create("pbi", torch.optim.SGD([param], lr=0.0), 2, theta=0.0)
        >>> losses = pbi.step(lambda: [1.0 * param[0], 1.0 * param[1]])
        >>> param.grad  # θ = 0: the projection on ŵ = (1, 1) / √2
        tensor([0.7071, 0.7071])
    """

    name = "pbi"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        theta: float = 5.0,
        weights: TaskValues | None = None,
        reference: TaskValues | None = None,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if not theta >= 0:
            raise ValueError(f"theta must be >= 0, got {theta}")
        self.theta = float(theta)
        dtype = state_dtype(optimizer)
        self.preference = preference(weights, num_tasks, self.device, dtype)
        self.reference = reference_point(reference, num_tasks, self.device, dtype)

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        shifted = losses - self.reference.to(losses.dtype)
        direction = self.preference.to(losses.dtype)
        direction = direction / direction.norm()
        along = shifted @ direction
        perpendicular = shifted - along * direction
        return along + self.theta * torch.sqrt(perpendicular @ perpendicular + D2_SHIFT)
