"""MGDA-UB: multiple-gradient descent, the min-norm point (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import torch

from .. import ops
from .gradient import WeightingMethod
from .jacobian import JacobianMode, SharedParams

NORMALIZATIONS: tuple[str, ...] = ("none", "l2")


class MGDA(WeightingMethod):
    """MGDA: the minimum-norm point of the convex hull of the task gradients.

    O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (arXiv 1810.04650); authors' code ``intel-isl/MultiObjectiveOptimization``
    (``MinNormSolver``: the 2-task closed form, the best-pair start, Frank-Wolfe with
    its line search), which the fused op ``ops.mgda_weights`` runs on the device.

    Convention (the authors'): the weights lie on the simplex (sum 1) and the
    training loss is ``Σ_k w_k L_k``, so the heads get ``w_k ∇L_k`` too. Gradient
    normalisation ``"none"`` (the authors' "none", the default of the Nash-MTL
    benchmark code) or ``"l2"`` (each gradient divided by its norm before the
    min-norm solve; the weights returned are then those of the raw gradients).
    The loss-based normalisations of the authors' code ("loss", "loss+") are not
    offered: ``aggregate`` sees gradients only.

    Options: ``normalization="none"``, ``max_iter=250``, ``tol=1e-5`` (the
    solver's), ``jacobian``. Cost per step: 1 forward, 1 vmapped backward (K with
    ``jacobian="loop"``) + 1 for the heads, 1 optimizer step.

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
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        shared_params: SharedParams,
        normalization: str = "none",
        max_iter: int = 250,
        tol: float = 1e-5,
        jacobian: JacobianMode = "batched",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, shared_params=shared_params, jacobian=jacobian, profile=profile)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    @staticmethod
    def gram_weights(gram: torch.Tensor, *, normalization: str = "none", max_iter: int = 250, tol: float = 1e-5) -> torch.Tensor:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "none":
            return ops.mgda_weights(gram, max_iter=max_iter, tol=tol)
        # Unit gradients u_k = g_k/‖g_k‖ have Gram D G D with D = diag(1/‖g_k‖); Σ w'_k u_k = Σ (w'_k/‖g_k‖) g_k.
        inv_norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()
        unit_gram = (gram * inv_norms[:, None] * inv_norms[None, :]).contiguous()
        return ops.mgda_weights(unit_gram, max_iter=max_iter, tol=tol) * inv_norms

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        return self.gram_weights(gram, normalization=self.normalization, max_iter=self.max_iter, tol=self.tol)
