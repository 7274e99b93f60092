"""The common step of the loss-weighting methods (UW, DWA, DTP, FAMO and the scalarizations).

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
from collections.abc import Callable, Sequence

import torch

from ..losses import ClosureOutput
from .base import MethodOptions, MethodReport, MultiTaskMethod, Unpack
from .nonfinite import tensor_state

#: What a per-task option of a loss weighting accepts: K numbers.
TaskValues = Sequence[float] | torch.Tensor


def task_values(
    name: str, values: TaskValues, num_tasks: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Option ``name`` (K finite numbers, one per task) as a tensor on the device; one ``ValueError`` line otherwise.

    Read on the host, at construction only.
    """
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if tensor.shape != (num_tasks,) or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be {num_tasks} finite numbers (one per task), got {values!r}")
    return tensor.to(device=device, dtype=dtype)


def preference(values: TaskValues | None, num_tasks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The preference vector of a scalarization (``weights=``): K numbers >= 0, not all 0; uniform ``1/K`` when None."""
    if values is None:
        return torch.full((num_tasks,), 1.0 / num_tasks, device=device, dtype=dtype)
    tensor = task_values("weights", values, num_tasks, device, torch.float64)
    if bool((tensor < 0).any()) or not bool((tensor > 0).any()):
        raise ValueError(f"weights must be >= 0 and not all 0, got {values!r}")
    return tensor.to(dtype)


def reference_point(
    values: TaskValues | None, num_tasks: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The reference point of a scalarization (``reference=``): K finite numbers; the origin when None."""
    if values is None:
        return torch.zeros(num_tasks, device=device, dtype=dtype)
    return task_values("reference", values, num_tasks, device, dtype)


def state_dtype(optimizer: torch.optim.Optimizer) -> torch.dtype:
    """The dtype of a loss weighting's state: that of the optimizer's first parameter."""
    return optimizer.param_groups[0]["params"][0].dtype


class LossWeightingMethod(MultiTaskMethod):
    """A method that back-propagates ``combine(L_1..L_K)`` once per step.

    Subclasses implement :meth:`_combine_losses` and, where needed,
    :meth:`_before_optimizer_step` (gradient clipping) and :meth:`_after_step`
    (learning from the step's outcome; both see unscaled gradients under a grad scaler, which
    also unscales the optimizers of :meth:`_learned_optimizers`). A step that ``nonfinite="skip"``
    or the grad scaler skips leaves the tensors of :attr:`saved_state` as they were (learned ones
    through their optimizer, stepped with ``self._nonfinite.step``).
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
            self._scaling.loss(total).backward()
        self._scaling.unscale_optimizers(self.optimizer, *self._learned_optimizers())
        self._before_optimizer_step()
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.optimizer)
        self._after_step(losses.detach(), closure)
        restore_state()
        self._scaling.update()
        return losses.detach()

    def _learned_optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The method's own optimizers whose gradients come from the step's backward (a grad scaler unscales them)."""
        return ()

    def _state_kept_on_skip(self) -> list[str]:
        """The state a skipped step restores: the tensors of :attr:`saved_state` but the learned ones (their optimizer skips)."""
        return [name for name in tensor_state(self) if not getattr(self, name).requires_grad]


class LearnedScalesMethod(LossWeightingMethod):
    """A loss weighting of K scales ``s`` (init 0) that the method learns itself (UW, IMTL-L).

    The scales belong to the method: it owns them (:attr:`scales`) and its own
    ``torch.optim.Adam`` over them (:attr:`scales_optimizer`), stepped right after the
    user's optimizer, ``lr=0.025`` by default (the Nash-MTL benchmark code's learning rate
    for the methods' parameters). The user does NOT add them to their optimizer; a skipped
    step skips their Adam too. Subclasses give the K terms of the training loss
    (:meth:`_scaled_losses`), the loss weights the scales mean (:attr:`weights`) and the
    names their ``state_dict`` keeps (aliases of :attr:`scales` and :attr:`scales_optimizer`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        lr: float = 0.025,
        **options: Unpack[MethodOptions],
    ) -> None:
        super().__init__(optimizer, num_tasks, **options)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        #: ``s``, the learned scales (the loss weights they mean: :attr:`weights`).
        self.scales = torch.nn.Parameter(torch.zeros(num_tasks, device=self.device, dtype=state_dtype(optimizer)))
        self.scales_optimizer = torch.optim.Adam([self.scales], lr=lr)

    @abc.abstractmethod
    def _scaled_losses(self, scales: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The K terms of the training loss, from the scales (in the losses' dtype) and the K losses."""

    def _learned_optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.scales_optimizer,)

    def _combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        self.scales_optimizer.zero_grad(set_to_none=True)
        return self._scaled_losses(self.scales.to(losses.dtype), losses).sum()

    def _after_step(self, losses: torch.Tensor, closure: Callable[[], ClosureOutput]) -> None:
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.scales_optimizer)
