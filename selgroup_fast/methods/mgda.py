"""MGDA-UB: multiple-gradient descent, the min-norm point (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .weighting import Weighting, validated_op_options

NORMALIZATIONS: tuple[str, ...] = ("none", "l2")


class MGDA(Weighting):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (arXiv 1810.04650); authors' code ``intel-isl/MultiObjectiveOptimization``
    (``MinNormSolver``: Frank-Wolfe from the best pair). The fused op ``ops.mgda_weights``
    solves the same problem on the device by Wolfe's active-set method, exactly up to the
    rounding of G, where Frank-Wolfe stops early on badly scaled tasks.

    Convention (the authors'): the weights lie on the simplex (sum 1) and the
    training loss is ``Σ_k w_k L_k``, so the heads get ``w_k ∇L_k`` too. Gradient
    normalisation ``"none"`` (the authors' "none", the default of the Nash-MTL
    benchmark code) or ``"l2"`` (each gradient divided by its norm before the
    min-norm solve; the weights returned are then those of the raw gradients).
    The loss-based normalisations of the authors' code ("loss", "loss+") are not
    offered: a weighting sees gradients only.

    Options: ``normalization="none"`` and those of :func:`selgroup_fast.ops.mgda_weights`
    (``max_iter``, ``tol``).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("mgda", J)
        tensor([0.5000, 0.5000])
    """

    name = "mgda"
    weights_task_params = True

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        normalization: str = "none",
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.options = validated_op_options(ops.mgda_weights, **options)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        if self.normalization == "none":
            return ops.mgda_weights(gram, **self.options)
        # Unit gradients u_k = g_k/‖g_k‖ have Gram D G D with D = diag(1/‖g_k‖); Σ w'_k u_k = Σ (w'_k/‖g_k‖) g_k.
        inv_norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()
        unit_gram = (gram * inv_norms[:, None] * inv_norms[None, :]).contiguous()
        return ops.mgda_weights(unit_gram, **self.options) * inv_norms
