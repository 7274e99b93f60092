"""IMTL-L: impartial multi-task learning, the loss balance (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021)."""

from __future__ import annotations

import torch

from .loss_weighting import LearnedScalesMethod


class IMTLL(LearnedScalesMethod):
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

    @property
    def log_scales(self) -> torch.nn.Parameter:
        """``s_k``, the learned log-scales (:attr:`scales`)."""
        return self.scales

    @property
    def log_scales_optimizer(self) -> torch.optim.Adam:
        """Their Adam (:attr:`scales_optimizer`)."""
        return self.scales_optimizer

    @property
    def weights(self) -> torch.Tensor:
        """The current loss weights ``exp(s_k)`` (detached)."""
        return torch.exp(self.scales.detach())

    def _scaled_losses(self, scales: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(scales) * losses - scales
