"""RLW: random loss weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022)."""

from __future__ import annotations

import torch

from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, state_dtype
from .pcgrad import seeded_generator


class RLW(LossWeightingMethod):
    """RLW: the losses weighted by ``softmax`` of K standard normals, drawn afresh at every step.

    B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv 2111.10603), Algorithm 2.

    Training loss ``Σ_k w_k L_k`` with ``w = softmax(ε)``, ``ε ~ N(0, I_K)`` (LibMTL's ``RLW``
    with its default ``dist="Normal"``, TorchJD's ``Random`` scalarizer). The draw is on the
    device, from the method's generator, in the dtype of the state (the parameters'): the
    method is reproducible and never syncs; the generator's state is the method's state (under
    DDP/FSDP2 every rank starts from the first rank's, so the ranks draw the same weights). With
    ``seed=s`` on a CPU in float32 the draws are those of ``torch.manual_seed(s)`` followed by
    TorchJD's ``Random``. The draw of a step ``nonfinite="skip"`` skips is used up.

    Options: ``seed`` (int, default: drawn from torch's global RNG) or ``generator`` (a
    ``torch.Generator`` on the device). Cost per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> rlw = selgroup_fast.methods.create("rlw", torch.optim.SGD([param], lr=0.0), 2, seed=0)
        >>> losses = rlw.step(lambda: list(param))
        >>> round(float(param.grad.sum()), 6)  # the weights: softmax of a normal draw
        1.0
    """

    name = "rlw"
    saved_state = ("generator",)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        self.generator = seeded_generator(self.device, seed, generator)
        if self.generator.device.type != self.device.type:
            raise ValueError(f"generator must be on the parameters' device {self.device}, got {self.generator.device}")
        self._ranks.share_generator(self.generator)
        self._dtype = state_dtype(optimizer)

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        draw = torch.randn(self.num_tasks, generator=self.generator, device=self.device, dtype=self._dtype)
        return (torch.softmax(draw, dim=0).to(losses.dtype) * losses).sum()
