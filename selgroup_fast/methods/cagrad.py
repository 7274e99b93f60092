"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .weighting import Weighting, validated_op_options


class CAGrad(Weighting):
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
    vector. The heads get ``∇ Σ_k L_k``. Relative to TorchJD 0.18's ``CAGrad(c)`` (the
    mean-based ``g0 + c‖g0‖/‖g_w‖ · g_w``, no rescale) our update is ``K/(1+c²)`` times
    theirs with the default ``rescale=1`` (``K`` with ``rescale=0``).

    Where zero lies in the task gradients' convex hull and the ball meets the cone
    ``{d : J d ≥ 0}`` (always for ``c ≥ 1``), no update improves every task and the
    update is the optimum closest to ``g0``, its projection on that cone (0 on strongly
    stationary gradients), see ``ops.cagrad_weights``.

    Options: those of :func:`selgroup_fast.ops.cagrad_weights` (``c``, ``rescale``,
    ``max_iter``, ``tol``; the authors' names and defaults).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("cagrad", J, c=0.0)    # the sum of the gradients
        tensor([1., 1.])
    """

    name = "cagrad"

    def __init__(
        self, num_tasks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **options: Any
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.options = validated_op_options(ops.cagrad_weights, **options)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        # The op's weights give the authors' mean-based direction; × K is their "match the sum loss".
        return ops.cagrad_weights(gram, **self.options) * gram.shape[0]
