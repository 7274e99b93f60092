"""FAMO: fast adaptive multitask optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..losses import ClosureOutput, parse_closure_output
from .base import MethodOptions, Unpack
from .jacobian import SharedParams, as_parameter_list
from .loss_weighting import LossWeightingMethod, state_dtype

#: The authors' shift inside the logarithms.
EPS = 1e-8


class FAMO(LossWeightingMethod):
    """FAMO: loss weights learned so that all log-losses decrease at the same rate, in O(1) per step.

    B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023 (arXiv 2306.03792); authors' code ``Cranial-XIX/FAMO`` (``famo.py``).

    With logits ``ξ`` (init 0), ``z = softmax(ξ)``, ``D_k = L_k - m_k + 1e-8`` (``m`` the
    known minimum losses, 0 by default) and ``c = Σ_k z_k / D_k`` (detached), the
    training loss is ``Σ_k z_k log D_k / c``. After the optimizer step the authors
    re-evaluate the losses on the same batch and move ξ along
    ``∂softmax(ξ)ᵀ δ`` with ``δ_k = log D_k(before) - log D_k(after)``, with their own
    ``Adam(lr=w_lr, weight_decay=gamma)``.

    The re-evaluation costs ONE EXTRA FORWARD per step (no backward; run under
    ``torch.no_grad``, timed as ``forward``): :meth:`step` calls the closure twice.
    If ``shared_params`` is given, the shared gradient is clipped to ``max_norm``
    before the step, as in the authors' ``backward`` (they clip only when they are
    given the shared parameters).

    Options (the authors' names and defaults): ``gamma=0.01`` (weight decay of the
    logits), ``w_lr=0.025``, ``max_norm=1.0``, ``shared_params=None``. State: the logits,
    their optimizer, the minimum losses (:meth:`set_min_losses`). Cost per step:
    2 forwards, 1 backward, 1 optimizer step.

    Example::

        >>> import torch, selgroup_fast
        >>> model = torch.nn.Linear(4, 2)
        >>> famo = selgroup_fast.methods.create("famo", torch.optim.SGD(model.parameters(), lr=0.1), 2)
        >>> x = torch.randn(8, 4)
        >>> losses = famo.step(lambda: list(model(x).pow(2).mean(0)))
        >>> round(float(famo.weights.sum()), 6)   # softmax weights
        1.0
    """

    name = "famo"
    saved_state = ("logits", "logits_optimizer", "min_losses")
    accepts_shared_params = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        gamma: float = 0.01,
        w_lr: float = 0.025,
        max_norm: float = 1.0,
        shared_params: SharedParams | None = None,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        dtype = state_dtype(optimizer)
        self.max_norm = float(max_norm)
        self.shared_params = None if shared_params is None else as_parameter_list(shared_params)
        #: The logits ξ of the task weights ``softmax(ξ)``.
        self.logits = torch.zeros(num_tasks, device=self.device, dtype=dtype, requires_grad=True)
        self.logits_optimizer = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        self.min_losses = torch.zeros(num_tasks, device=self.device, dtype=dtype)
        self._log_before: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        """The task weights ``softmax(ξ)`` (detached)."""
        return torch.softmax(self.logits.detach(), dim=0)

    def set_min_losses(self, min_losses: torch.Tensor) -> None:
        """Sets the known lower bounds ``m_k`` of the task losses (default 0)."""
        min_losses = torch.as_tensor(min_losses, dtype=self.min_losses.dtype).to(self.device)
        if min_losses.shape != (self.num_tasks,):
            raise ValueError(f"expected {self.num_tasks} minimum losses, got shape {tuple(min_losses.shape)}")
        self.min_losses = min_losses.clone()

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return losses - self.min_losses.to(losses.dtype) + EPS

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        z = self.weights.to(losses.dtype)
        shifted = self._shifted(losses)
        self._log_before = shifted.detach().log()
        return (shifted.log() * z).sum() / (z / shifted.detach()).sum()

    def _before_optimizer_step(self) -> None:
        if self.shared_params is not None and self.max_norm > 0:
            with self._timer.phase("manipulation"):
                torch.nn.utils.clip_grad_norm_(self.shared_params, self.max_norm)

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        with self._timer.phase("forward"), torch.no_grad():
            after = self._ranks.mean(torch.stack(parse_closure_output(closure(), self.num_tasks).losses).detach())
        log_before = self._log_before
        assert log_before is not None, "_combine_losses runs before _after_step in every step"
        with self._timer.phase("manipulation"):
            delta = log_before - self._shifted(after.to(log_before.dtype)).log()
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(
                    torch.softmax(self.logits, dim=0), self.logits, grad_outputs=delta.to(self.logits.dtype)
                )
            self.logits_optimizer.zero_grad(set_to_none=True)
            self.logits.grad = grad
            self._nonfinite.step(self.logits_optimizer)
