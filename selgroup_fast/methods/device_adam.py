"""``torch.optim.Adam``'s step on a weighting's own K-vector, its state plain tensors on the device.

The weightings that learn their own numbers from the losses (GradNorm's logits, IMTL's hybrid loss scales) step
them inside the training step with this closed-form Adam rather than a ``torch.optim.Adam``: its moments and step
count are tensors of :attr:`~.base.SavedState.saved_state`, which a skipped non-finite step restores
(:mod:`.nonfinite`) and a resume reloads bit for bit, with no host-side step count.
"""

from __future__ import annotations

import torch

#: ``torch.optim.Adam``'s defaults, which LibMTL's optimizer of the loss scales uses.
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def adam_step(
    parameter: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: torch.Tensor,
    gradient: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """One ``torch.optim.Adam`` step (L2 ``weight_decay``, default betas and eps) of ``parameter``, in place."""
    beta1, beta2 = ADAM_BETAS
    gradient = gradient + weight_decay * parameter
    steps += 1
    exp_avg.lerp_(gradient, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
    correction1 = 1 - torch.pow(beta1, steps)
    correction2 = 1 - torch.pow(beta2, steps)
    denominator = (exp_avg_sq.sqrt() / correction2.sqrt()).add_(ADAM_EPS)
    parameter.addcdiv_(exp_avg, denominator * (correction1 / lr), value=-1.0)
