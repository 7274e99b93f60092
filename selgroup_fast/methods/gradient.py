"""The one training step of every gradient method (PCGrad, CAGrad, MGDA, GradDrop, IMTL-G, Aligned-MTL, Nash-MTL)."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from ..losses import ClosureOutput
from .base import MultiTaskMethod, detached
from .jacobian import JacobianMode, SharedParams, TaskJacobian
from .weighting import Aggregator

Space = Literal["parameters", "representation"]
SPACES: tuple[str, ...] = ("parameters", "representation")


class GradientMethod(MultiTaskMethod):
    """The training step of a gradient method, driving its :class:`~selgroup_fast.methods.weighting.Aggregator`.

    Phases: ``forward`` (the closure); ``backward`` (the task gradients J into a preallocated
    buffer); ``manipulation`` (the aggregator's direction, written straight into the flat
    buffer whose slices are the shared parameters' ``.grad``); ``backward`` (the heads: one
    ordinary backward of ``Σ_k L_k``, of ``Σ_k w_k L_k`` where ``Aggregator.weights_task_params``);
    ``optimizer``. ``space="representation"`` takes J w.r.t. the shared features z the closure
    returns as ``(losses, features)`` (Sener & Koltun, NeurIPS 2018, §3.3): one backward through
    the heads for all K tasks, then ONE backward through the encoder with the direction as
    z's gradient. Nothing reads a value back to the host (no CUDA synchronisation).

    Args:
        optimizer: drives every parameter (shared and task-specific).
        num_tasks: K.
        aggregator: the method (``selgroup_fast.methods.aggregator(name, K, device, dtype, **options)``).
        shared_params: the parameters shared by all tasks (the encoder's).
        jacobian: ``"batched"`` (one vmapped backward) or ``"loop"`` (K backwards).
        chunk_size: with ``"batched"``, at most this many tasks per vmapped backward (bounded peak memory).
        space: ``"parameters"`` or ``"representation"`` (the closure then returns ``(losses, features)``).
        profile: time the phases of every step (:attr:`timings`).

    Example::

        >>> import torch, selgroup_fast
        >>> enc, heads = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
        >>> m = selgroup_fast.methods.create("mgda", opt, 2, shared_params=enc.parameters(), space="representation")
        >>> x = torch.randn(8, 4)
        >>> def closure():
        ...     z = enc(x)
        ...     return list(heads(z).pow(2).mean(0)), z
        >>> m.step(closure).shape
        torch.Size([2])
    """

    uses_shared_params = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        aggregator: Aggregator,
        *,
        shared_params: SharedParams,
        jacobian: JacobianMode = "batched",
        chunk_size: Optional[int] = None,
        space: Space = "parameters",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if aggregator.num_tasks != num_tasks:
            raise ValueError(f"the aggregator is for {aggregator.num_tasks} tasks, the method for {num_tasks}")
        self.aggregator = aggregator
        self.name = aggregator.name
        self.space = space
        # The K×P buffer is only needed in parameter space.
        self._jacobian = TaskJacobian(
            shared_params, num_tasks, mode=jacobian, chunk_size=chunk_size, allocate=space == "parameters"
        )
        if self._jacobian.direction.device != self.device:
            raise ValueError(f"shared_params are on {self._jacobian.direction.device}, the optimizer on {self.device}")
        shared_ids = {id(p) for p in self._jacobian.params}
        self._task_params = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and id(p) not in shared_ids
        ]

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self._jacobian.params

    @property
    def task_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters that are not shared (each task's own head)."""
        return self._task_params

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._timer.reset()
        self.optimizer.zero_grad(set_to_none=True)
        losses, features = self._run_closure(closure)
        reused = self.aggregator.reused_weights()
        if reused is not None:  # one ordinary backward of Σ w_k L_k, the shared gradient clipped (Nash-MTL)
            with self._timer.phase("backward"):
                self._weighted_backward(losses, reused, None, retain_graph=False)
            with self._timer.phase("manipulation"):
                if self.aggregator.max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.shared_params, self.aggregator.max_norm)
        elif self.space == "parameters":
            with self._timer.phase("backward"):
                jacobian = self._jacobian.compute(losses, retain_graph=bool(self._task_params))
            with self._timer.phase("manipulation"):
                _, head_weights = self.aggregator.combine(jacobian, out=self._jacobian.direction)
                self._jacobian.assign_grads()
            self._backward_task_params(losses, head_weights, retain_graph=False)
        else:
            if not features:
                raise ValueError(
                    'space="representation" needs the closure to return (losses, features), features being the '
                    "shared representation (the encoder's output)"
                )
            with self._timer.phase("backward"):
                jacobian = self._jacobian.of_features(losses, features)
            with self._timer.phase("manipulation"):
                direction, head_weights = self.aggregator.combine(jacobian)
            self._backward_task_params(losses, head_weights, retain_graph=True)
            with self._timer.phase("backward"):
                self._jacobian.pull_back(features, direction)
                self._jacobian.assign_grads()
        with self._timer.phase("optimizer"):
            self.optimizer.step()
        return detached(losses)

    @staticmethod
    def _weighted_backward(
        losses: list[torch.Tensor], weights: Optional[torch.Tensor], inputs: Optional[list[torch.Tensor]], retain_graph: bool
    ) -> None:
        """One ordinary backward of ``Σ_k w_k L_k`` (``Σ_k L_k`` without weights) into ``inputs`` (None: all)."""
        stacked = torch.stack(losses)
        total = stacked.sum() if weights is None else (weights.detach().to(stacked.dtype) * stacked).sum()
        torch.autograd.backward(total, inputs=inputs, retain_graph=retain_graph)

    def _backward_task_params(self, losses: list[torch.Tensor], weights: Optional[torch.Tensor], retain_graph: bool) -> None:
        if self._task_params:
            with self._timer.phase("backward"):
                self._weighted_backward(losses, weights, self._task_params, retain_graph)

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.aggregator.load_state_dict(state_dict)
