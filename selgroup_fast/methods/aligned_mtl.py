"""Aligned-MTL: gradient alignment by the condition number (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .weighting import Weighting, validated_op_options


class AlignedMTL(Weighting):
    """Aligned-MTL: the task gradients made orthogonal and equally long, scaled by the smallest singular value.

    D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023 (arXiv 2305.19000); authors' code
    ``SamsungLabs/MTL``.

    With ``G = V Λ Vᵀ`` (eigendecomposition, eigenvalues below the authors' tolerance
    dropped) the aligned system is ``B = sqrt(λ_min) V Λ^{-1/2} Vᵀ`` and, with equal
    task preferences, ``d = Σ_k (B 1)_k g_k``. The fused op ``ops.aligned_mtl_weights``
    does the eigendecomposition on the device (a small Householder + QL solver: no host sync)
    and returns those weights.

    Convention: the authors' (equal preferences, scaling by the smallest singular
    value of the task-gradient matrix by default); the heads get ``∇ Σ_k L_k``.
    Option ``scale_mode="min"`` (TorchJD 0.18's, the authors' ``scale_mode``): σ is the
    smallest kept eigenvalue (``"min"``), their median (``"median"``, ``torch.median``'s:
    the lower middle one for an even count) or their mean (``"rmse"``); the op,
    :func:`selgroup_fast.ops.aligned_mtl_weights`, checks it.
    The direction is the SUM of the aligned gradients: K times TorchJD's ``AlignedMTL``
    (whose default preference vector is the mean, 1/K). The rank is cut at
    ``λ_max·K·ε`` with ε the epsilon of the gradients' dtype (as the authors and TorchJD):
    in float32 the directions with singular values below about ``sqrt(K·ε)·σ_max`` are
    lost in the rounding of G and get no weight.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("aligned_mtl", J)   # both gradients rescaled to the smallest norm
        tensor([1., 1.])
        >>> selgroup_fast.methods.aggregate("aligned_mtl", J, scale_mode="rmse")   # σ = mean(4, 1)
        tensor([1.5811, 1.5811])
    """

    name = "aligned_mtl"

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.options = validated_op_options(ops.aligned_mtl_weights, **options)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.aligned_mtl_weights(gram, **self.options)
