"""COSMOS: the scalarization of Ruchte & Grabocka (ICDM 2021)."""

from __future__ import annotations

import torch

from .base import MethodOptions, Unpack
from .loss_weighting import LossWeightingMethod, TaskValues, preference, state_dtype


class COSMOS(LossWeightingMethod):
    """COSMOS: a linear scalarization rewarded for the losses' alignment with the preference.

    M. Ruchte, J. Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective
    Learning", ICDM 2021 (arXiv 2103.13392).

    Training loss ``Σ_k r_k L_k − λ cos(r, L)`` with ``cos(r, L) = r·L / (‖r‖ ‖L‖)``
    (``torch.nn.functional.cosine_similarity``, as TorchJD's ``COSMOS``). The preference ``r``
    is fixed (``weights``); the paper draws it from a Dirichlet distribution at every step and
    feeds it to the model to learn the whole Pareto front, a modelling choice this method (as
    TorchJD's scalarizer) leaves to the user.

    Options: ``lambda_=1.0`` (λ >= 0; TorchJD has no default, the paper uses 0.01 to 8; 0 is the
    linear scalarization), ``weights=None`` (K numbers >= 0; default ``1/K``). No state. Cost
    per step: 1 forward, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> cosmos = selgroup_fast.methods.create("cosmos", torch.optim.SGD([param], lr=0.0), 2, lambda_=0.0)
        >>> losses = cosmos.step(lambda: [1.0 * param[0], 4.0 * param[1]])
        >>> param.grad  # λ = 0: the mean of the losses
        tensor([0.5000, 2.0000])
    """

    name = "cosmos"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        lambda_: float = 1.0,
        weights: TaskValues | None = None,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)
        self.preference = preference(weights, num_tasks, self.device, state_dtype(optimizer))

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        weights = self.preference.to(losses.dtype)
        cosine = torch.nn.functional.cosine_similarity(weights, losses, dim=0)
        return (weights * losses).sum() - self.lambda_ * cosine
