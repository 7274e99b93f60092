"""UW: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import torch

from .loss_weighting import LearnedScalesMethod


class UW(LearnedScalesMethod):
    """UW: task losses weighted by learned homoscedastic uncertainties.

    A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv 1705.07115).

    Training loss ``Σ_k ½ (exp(-s_k) L_k + s_k)`` with ``s_k = log σ_k²`` learned,
    initialised at 0 (the convention of the authors' example notebook and of the
    Nash-MTL benchmark code).

    The log-variances belong to the method: it owns them (:attr:`log_vars`) and its
    own ``torch.optim.Adam`` over them, stepped right after the user's optimizer,
    with ``lr=0.025`` by default (the Nash-MTL benchmark code's learning rate for
    the methods' parameters). The user does NOT add them to their optimizer.
    :meth:`state_dict` saves both.

    Options: ``lr=0.025``. Cost per step: 1 forward, 1 backward, 1 optimizer step
    (+ a K-element Adam step).

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> uw = selgroup_fast.methods.create("uw", torch.optim.SGD(model.parameters(), lr=0.1), 2)
        >>> x = torch.randn(8, 4)
        >>> losses = uw.step(lambda: list(model(x).pow(2).mean(0)))
        >>> uw.log_vars.shape
        torch.Size([2])
    """

    name = "uw"
    saved_state = ("log_vars", "log_vars_optimizer")

    @property
    def log_vars(self) -> torch.nn.Parameter:
        """``s_k = log σ_k²``, the learned log-variances (:attr:`scales`)."""
        return self.scales

    @property
    def log_vars_optimizer(self) -> torch.optim.Adam:
        """Their Adam (:attr:`scales_optimizer`)."""
        return self.scales_optimizer

    @property
    def weights(self) -> torch.Tensor:
        """The current loss weights ``½ exp(-s_k)`` (detached)."""
        return 0.5 * torch.exp(-self.scales.detach())

    def _scaled_losses(self, scales: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.exp(-scales) * losses + scales)
