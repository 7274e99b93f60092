"""MGDA-UB: multiple-gradient descent, the min-norm point (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .weighting import Weighting, WeightingInputs, read_gram, validated_op_options

#: The authors' ``gradient_normalizers`` (MinNormSolver, LibMTL's ``mgda_gn``): what each gradient is divided by.
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "loss", "loss+")
#: The normalisations that read the task losses.
LOSS_NORMALIZATIONS: frozenset[str] = frozenset({"loss", "loss+"})


class MGDA(Weighting):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (arXiv 1810.04650); authors' code ``intel-isl/MultiObjectiveOptimization``
    (``MinNormSolver``: Frank-Wolfe from the best pair). The fused op ``ops.mgda_weights``
    solves the same problem on the device by Wolfe's active-set method, exactly up to the
    rounding of G, where Frank-Wolfe stops early on badly scaled tasks.

    Convention (the authors'): the weights lie on the simplex (sum 1) and the
    training loss is ``Σ_k w_k L_k``, so the heads get ``w_k ∇L_k`` too. Gradient
    normalisation, the authors' ``gradient_normalizers`` (LibMTL's ``mgda_gn``): each
    gradient is divided by ``n_k`` before the min-norm solve, ``n_k = 1`` (``"none"``, the
    default of the Nash-MTL benchmark code), ``‖g_k‖`` (``"l2"``), ``L_k`` (``"loss"``) or
    ``L_k·‖g_k‖`` (``"loss+"``); the weights returned are those of the raw gradients,
    ``w_k = w'_k / n_k`` (LibMTL's update ``Σ_k w'_k g_k/n_k``). ``"loss"`` and ``"loss+"``
    read the K losses of the batch (:attr:`needs` names them then, the others read G only),
    which the peers take positive (a loss of 0 divides by 0: non-finite weights, which the
    step's ``nonfinite=`` policy meets).

    Options: ``normalization="none"`` and those of :func:`selgroup_fast.ops.mgda_weights`
    (``max_iter``, ``tol``).

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("mgda", J)
        tensor([0.5000, 0.5000])
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("mgda", J, normalization="loss", losses=torch.tensor([2.0, 1.0]))
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
        if normalization in LOSS_NORMALIZATIONS:
            self.needs = frozenset({"losses"})
        self.options = validated_op_options(ops.mgda_weights, **options)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        if self.normalization in LOSS_NORMALIZATIONS:
            raise ValueError(f"mgda: normalization={self.normalization!r} reads the losses: call weights_with")
        return self.weights_with(WeightingInputs(gram))

    def weights_with(self, inputs: WeightingInputs) -> torch.Tensor:
        gram = read_gram(inputs.gram)
        if self.normalization == "none":
            return ops.mgda_weights(gram, **self.options)
        normalizers = torch.ones_like(gram.diagonal())
        if self.normalization in ("l2", "loss+"):
            normalizers = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
        if inputs.losses is not None:  # "loss", "loss+": needs declares them, the step provides them
            normalizers = normalizers * inputs.losses.to(gram.dtype)
        # The normalised gradients g_k/n_k have Gram D G D, D = diag(1/n_k); Σ w'_k g_k/n_k = Σ (w'_k/n_k) g_k.
        inverse = normalizers.reciprocal()
        return ops.mgda_weights((gram * inverse[:, None] * inverse[None, :]).contiguous(), **self.options) * inverse
