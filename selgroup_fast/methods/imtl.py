"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch

from .. import ops
from .weighting import Weighting


class IMTL(Weighting):
    """IMTL-G: the update whose projections onto every unit task gradient are equal.

    L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021 (the gradient balancing part, IMTL-G).

    Closed form: with ``u_k = g_k / ‖g_k‖``, ``D = [g_1 - g_k]_{k>1}``,
    ``U = [u_1 - u_k]_{k>1}``, ``α_{2..K} = g_1 Uᵀ (D Uᵀ)⁻¹`` and ``α_1 = 1 - Σ α_{2..K}``;
    ``d = Σ_k α_k g_k``. The fused op ``ops.imtl_weights`` computes α from the Gram
    matrix alone, without an anchor task: on linearly dependent gradients it takes the
    least-norm (pseudo-inverse) solution, which does not depend on the task order.

    Convention: the weights sum to 1 (a scaled mean, as in the paper and the
    Nash-MTL benchmark code). As there, the training loss is ``Σ_k α_k L_k``, so the
    heads get ``α_k ∇L_k``. No options.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("imtl", J)   # equal projections on both unit gradients
        tensor([0.6667, 0.6667])
    """

    name = "imtl"
    weights_task_params = True

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.imtl_weights(gram)
