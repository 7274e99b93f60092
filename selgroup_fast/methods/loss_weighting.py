"""The common step of the loss-weighting methods (UW, DWA, DTP, FAMO).

These methods need no per-task gradients: one step is one forward, ONE backward
of a weighted combination of the task losses, one optimizer step. The weights
are computed on the device from the method's state (timed as ``manipulation``);
no value is read back to the host, so on CUDA the step never synchronises.
Under DDP/FSDP2 what the weights learn from is the global batch's losses (the
ranks' mean, one all-reduce of K numbers: ``RankAgreement.global_losses``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import torch

from ..losses import ClosureOutput
from .base import MethodReport, MultiTaskMethod
from .nonfinite import tensor_state


class LossWeightingMethod(MultiTaskMethod):
    """A method that back-propagates ``combine(L_1..L_K)`` once per step.

    Subclasses implement :meth:`_combine_losses` and, where needed,
    :meth:`_before_optimizer_step` (gradient clipping) and :meth:`_after_step`
    (learning from the step's outcome). A step that ``nonfinite="skip"`` skips leaves the
    tensors of :attr:`saved_state` as they were (learned ones through their optimizer,
    stepped with ``self._nonfinite.step``).
    """

    @property
    def weights(self) -> torch.Tensor | None:
        """The K loss weights now (detached), for :meth:`report`; ``None``: the method does not say them."""
        return None

    def report(self) -> MethodReport:
        """The skipped steps and the current loss weights (:attr:`weights`)."""
        return dataclasses.replace(super().report(), weights=self.weights)

    @abc.abstractmethod
    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar training loss for the K losses of this step (a 1-D tensor)."""

    def _before_optimizer_step(self) -> None:
        """Adjusts the gradients between the backward and the optimizer step (default: nothing)."""

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        """Updates the method's state once the optimizer has stepped (default: nothing)."""

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._ranks.global_losses(torch.stack(self._forward(closure)))
        self._nonfinite.check(losses)
        restore_state = self._nonfinite.keep(self, self._state_kept_on_skip())
        with self._timer.phase("manipulation"):
            total = self._combine_losses(losses)
        with self._timer.phase("backward"):
            total.backward()
        self._before_optimizer_step()
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.optimizer)
        self._after_step(losses.detach(), closure)
        restore_state()
        return losses.detach()

    def _state_kept_on_skip(self) -> list[str]:
        """The state a skipped step restores: the tensors of :attr:`saved_state` but the learned ones (their optimizer skips)."""
        return [name for name in tensor_state(self) if not getattr(self, name).requires_grad]
