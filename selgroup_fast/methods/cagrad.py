"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch

from .. import ops
from .gradient import WeightingMethod
from .jacobian import JacobianMode, SharedParams


class CAGrad(WeightingMethod):
    """CAGrad: the update that maximises the worst task improvement in a ball around the mean gradient.

    B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021 (arXiv 2110.14048); authors' code
    ``Cranial-XIX/CAGrad``.

    With ``g0`` the mean gradient, the authors solve
    ``min_{x ∈ Δ} xᵀ G 1/K + c ‖g0‖ sqrt(xᵀ G x)`` and take
    ``d = (g0 + c ‖g0‖ / ‖g_x‖ · g_x) / (1 + c²)`` (``rescale=1``; ``0``: no division,
    ``2``: divide by ``1 + c``). The fused op ``ops.cagrad_weights`` solves that
    problem on the device and returns the weights of ``d`` over the task gradients.

    Convention: the authors' code multiplies ``d`` by K "to match the sum loss"
    before writing it into the shared gradients, and so do we: with ``c = 0``
    CAGrad is exactly GD on ``Σ_k L_k``. ``aggregate`` returns this same K-scaled
    vector. The heads get ``∇ Σ_k L_k``.

    Options (the authors' names and defaults): ``c=0.4``, ``rescale=1``, and
    ``jacobian``. Cost per step: 1 forward, 1 vmapped backward (K with
    ``jacobian="loop"``) + 1 for the heads, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("cagrad", J, c=0.0)    # the sum of the gradients
        tensor([1., 1.])
    """

    name = "cagrad"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        shared_params: SharedParams,
        c: float = 0.4,
        rescale: int = 1,
        jacobian: JacobianMode = "batched",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, shared_params=shared_params, jacobian=jacobian, profile=profile)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = int(rescale)

    @staticmethod
    def gram_weights(gram: torch.Tensor, *, c: float = 0.4, rescale: int = 1) -> torch.Tensor:
        # The op's weights give the authors' mean-based direction; × K is their "match the sum loss".
        return ops.cagrad_weights(gram, c=c, rescale=rescale) * gram.shape[0]

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        return self.gram_weights(gram, c=self.c, rescale=self.rescale)
