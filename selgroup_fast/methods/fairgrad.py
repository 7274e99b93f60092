"""FairGrad: α-fair resource allocation among the tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .nash_mtl import clip_weights
from .weighting import Weighting, read_gram, validated_op_options


class FairGrad(Weighting):
    """FairGrad: the α-fair weights ``G w = w^(−1/α)`` (elementwise), ``d = Σ_k w_k g_k``.

    H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
    (arXiv 2402.15638, Eq. 4 and Algorithm 1); authors' code ``OptMN-Lab/fairgrad``
    (``methods/weight_methods.py``, ``FairGrad``); TorchJD 0.18 ``FairGrad(alpha)``.

    Rule: the update maximises ``Σ_k f_α(g_kᵀ d)`` over a ball, whose optimum is
    ``d = Σ_k w_k g_k`` with ``(G w)_k = w_k^(−1/α)``: α = 0 is the mean (weights 1/K,
    the authors' linear scalarisation), α = 1 Nash-MTL's proportional fairness, α → ∞
    the max-min fairness. The authors and TorchJD call scipy's ``least_squares`` from
    the uniform 1/K; the fused op :func:`selgroup_fast.ops.fairgrad_weights` solves the
    same equations by damped Newton on the device, to the precision of G (docs/baselines.md).

    Convention (the authors'): the heads get ``Σ_k ∇L_k`` (one backward per task, unweighted),
    and the shared gradient is clipped to norm ``max_norm`` (``clip_grad_norm_``;
    ``max_norm <= 0`` disables it; TorchJD does not clip: ``max_norm=0`` is TorchJD's direction).

    Options: ``alpha=1.0`` (the authors' default; TorchJD requires it; finite, ≥ 0),
    ``max_norm=1.0`` (the authors'), ``max_iters`` (TorchJD's name: the most Newton
    iterations; ``None``: the op's default, 50) and ``tol`` (the op's). Stateless.

    Example::

        >>> import torch, selgroup_fast
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> selgroup_fast.methods.aggregate("fairgrad", J, alpha=2.0, max_norm=0.0)   # 4 w_1 = w_1^(−½)
        tensor([0.7937, 1.0000])
    """

    name = "fairgrad"

    def __init__(
        self,
        num_tasks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        alpha: float = 1.0,
        max_norm: float = 1.0,
        max_iters: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, device, dtype)
        self.max_norm = float(max_norm)
        if max_iters is not None:
            options["max_iter"] = max_iters
        self.options = validated_op_options(ops.fairgrad_weights, alpha=float(alpha), **options)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return ops.fairgrad_weights(gram, **self.options)

    def direction_weights(
        self, gram: torch.Tensor | None, losses: torch.Tensor | None = None, cross_gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gram = read_gram(gram)
        return clip_weights(self.weights(gram), gram, self.max_norm), None
