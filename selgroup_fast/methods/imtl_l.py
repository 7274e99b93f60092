"""IMTL-L: impartial multi-task learning, the loss balance (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..losses import ClosureOutput
from .loss_weighting import LossWeightingMethod, learned_scales, state_dtype
from .nonfinite import DEFAULT_NONFINITE


class IMTLL(LossWeightingMethod):
    """IMTL-L: task losses scaled by learned ``e^{s_k}``, regularised by ``-s_k``.

    L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021, §3.2 (the loss balance; IMTL-G, the gradient
    balance, is the ``imtl`` method).

    Training loss ``Σ_k (e^{s_k} L_k − s_k)`` with ``s`` learned, initialised at 0 (TorchJD's
    ``IMTLL``): the scaled losses ``e^{s_k} L_k`` are driven to 1. It is UW at ``−s`` times 2.

    As for UW, the scales belong to the method: it owns them (:attr:`log_scales`) and its own
    ``torch.optim.Adam`` over them, stepped right after the user's optimizer, with
    ``lr=0.025`` by default (TorchJD has the user add them to the model's optimizer; the
    repository's convention for learned loss weights is UW's). The user does NOT add them to
    their optimizer. :meth:`state_dict` saves both.

    Options: ``lr=0.025``. Cost per step: 1 forward, 1 backward, 1 optimizer step
    (+ a K-element Adam step).

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> imtl_l = selgroup_fast.methods.create("imtl_l", torch.optim.SGD(model.parameters(), lr=0.1), 2)
        >>> x = torch.randn(8, 4)
        >>> losses = imtl_l.step(lambda: list(model(x).pow(2).mean(0)))
        >>> imtl_l.weights.shape
        torch.Size([2])
    """

    name = "imtl_l"
    saved_state = ("log_scales", "log_scales_optimizer")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        lr: float = 0.025,
        profile: bool = False,
        process_group: Any = None,
        nonfinite: str = DEFAULT_NONFINITE,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile, process_group=process_group, nonfinite=nonfinite)
        #: ``s_k``, the learned log-scales.
        self.log_scales, self.log_scales_optimizer = learned_scales(num_tasks, lr, self.device, state_dtype(optimizer))

    @property
    def weights(self) -> torch.Tensor:
        """The current loss weights ``exp(s_k)`` (detached)."""
        return torch.exp(self.log_scales.detach())

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        self.log_scales_optimizer.zero_grad(set_to_none=True)
        log_scales = self.log_scales.to(losses.dtype)
        return (torch.exp(log_scales) * losses - log_scales).sum()

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.log_scales_optimizer)
