"""GLS: the geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019)."""

from __future__ import annotations

import torch

from .loss_weighting import LossWeightingMethod


class GLS(LossWeightingMethod):
    """GLS: the training loss is the geometric mean of the task losses.

    S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, "MultiNet++: Multi-Stream Feature
    Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

    Training loss ``(Π_k L_k)^{1/K}``, computed as ``exp(mean_k log L_k)`` (TorchJD's
    ``GeometricMean``; LibMTL's ``GLS`` takes the K-th root of the product, the same value,
    which under- or overflows sooner). Its gradient weighs task k by ``G / (K L_k)``: the tasks
    with small losses get large weights. The losses must be positive: a zero loss gives a NaN
    gradient, a negative one a NaN training loss (not checked in the step: that would read the
    losses back to the host). No options, no state. Cost per step: 1 forward, 1 backward,
    1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> gls = selgroup_fast.methods.create("gls", torch.optim.SGD([param], lr=0.0), 2)
        >>> losses = gls.step(lambda: [1.0 * param[0], 4.0 * param[1]])
        >>> param.grad / torch.tensor([1.0, 4.0])  # ∂T/∂L_k = G / (K L_k), G = √(1 · 4) = 2
        tensor([1.0000, 0.2500])
    """

    name = "gls"

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.log(losses).mean())
