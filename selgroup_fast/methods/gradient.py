"""The common step of the gradient-manipulation methods (PCGrad, CAGrad, MGDA, ...).

Every such method turns the K×P matrix ``J`` of per-task gradients of the shared
parameters into one update direction ``d`` (a P-vector). All but GradDrop are a
*weighting*: ``d = wᵀJ`` with weights ``w`` that depend only on the Gram matrix
``G = J Jᵀ`` (K×K) and the method's options and state; the weights come from the
fused ops of :mod:`selgroup_fast.ops`. One step (:meth:`GradientMethod.step`):

1. ``forward``: the closure, K losses;
2. ``backward``: ``J`` into a preallocated K×P buffer (:class:`TaskJacobian`,
   ``jacobian="batched"`` (default) or ``"loop"``);
3. ``manipulation``: ``G = J Jᵀ``, ``w = op(G)``, ``d = wᵀJ`` written straight into
   the flat buffer whose slices are the shared parameters' ``.grad``;
4. ``backward``: the task-specific parameters (every optimizer parameter that is
   not shared) get their own task's gradient from one ordinary backward of
   ``Σ_k L_k`` (of ``Σ_k w_k L_k`` for the methods whose authors back-propagate
   the weighted loss through the heads, which say so);
5. ``optimizer``: ``optimizer.step()``.

Nothing in it reads a value back to the host, so on CUDA the step queues
without synchronising.

Scaling out (README "Scaling out"):

* ``torch.compile``: the Jacobian's backwards keep the graph for the next one, which
  AOTAutograd forbids for a backward compiled with donated buffers; the forward runs with
  ``torch._functorch.config.donated_buffer`` off, so a model compiled at its first
  forward inside :meth:`GradientMethod.step` gets a backward that may be retained.
* DDP: every gradient is computed with ``torch.autograd.grad``, which bypasses DDP's
  reducer; ``J`` is averaged across the ranks with one all-reduce (K×P numbers) and the
  task-specific gradients with a second (P_heads numbers), so the direction is the
  global batch's and nothing reduces it again.
* FSDP2 (DTensor parameters) is refused with a clear error: its graph holds unsharded
  copies of the parameters, which ``torch.autograd.grad`` would have to target.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import torch
import torch._functorch.config

from ..losses import ClosureOutput
from ..parallel import TaskParams, is_sharded
from .base import MultiTaskMethod, detached
from .jacobian import JacobianMode, SharedParams, TaskJacobian

#: Options of ``create`` that only concern the training step, not the combination
#: of gradients; ``aggregate`` accepts and ignores them so that it takes the same
#: options as ``create``.
STEP_ONLY_OPTIONS: frozenset[str] = frozenset({"jacobian", "profile", "shared_params"})


def check_jacobian(jacobian: torch.Tensor) -> torch.Tensor:
    """Validates a K×P matrix of task gradients (floating point, K ≥ 1, P ≥ 1)."""
    if not isinstance(jacobian, torch.Tensor):
        raise TypeError(f"jacobian must be a torch.Tensor, got {type(jacobian).__name__}")
    if jacobian.dim() != 2 or jacobian.shape[0] < 1 or jacobian.shape[1] < 1:
        raise ValueError(f"jacobian must be a non-empty K×P matrix, got shape {tuple(jacobian.shape)}")
    if jacobian.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"jacobian must be float32 or float64, got {jacobian.dtype}")
    return jacobian


def gram(jacobian: torch.Tensor) -> torch.Tensor:
    """``G = J Jᵀ`` (K×K), contiguous, on the Jacobian's device."""
    return (jacobian @ jacobian.T).contiguous()


class GradientMethod(MultiTaskMethod):
    """A method that needs the per-task gradients of the shared parameters.

    Subclasses implement :meth:`_combine`, which writes the update direction into
    ``out``, and a classmethod ``aggregate(jacobian, **options)``.
    """

    uses_shared_params = True
    #: Whether the heads get ``Σ_k w_k ∇L_k`` (the authors' weighted loss) instead of ``Σ_k ∇L_k``.
    weights_task_params = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        shared_params: SharedParams,
        jacobian: JacobianMode = "batched",
        profile: bool = False,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile)
        self._jacobian = TaskJacobian(shared_params, num_tasks, mode=jacobian)
        if self._jacobian.matrix.device != self.device:
            raise ValueError(f"shared_params are on {self._jacobian.matrix.device}, the optimizer on {self.device}")
        shared_ids = {id(p) for p in self._jacobian.params}
        self._task_params = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and id(p) not in shared_ids
        ]
        if any(is_sharded(p) for p in [*self._jacobian.params, *self._task_params]):
            raise ValueError(
                f"{type(self).__name__} does not support sharded (FSDP2/DTensor) parameters: the per-task "
                "gradients need the full parameters; train it with DistributedDataParallel (or use gd, selective "
                "or a loss-weighting method with FSDP2)"
            )

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self._jacobian.params

    @property
    def task_params(self) -> list[torch.Tensor]:
        """The task-specific parameters: ``task_params=`` of ``create``, else the optimizer's non-shared ones."""
        return self._task_params

    def use_task_params(self, owners: TaskParams) -> None:
        """Takes the task-specific parameters from ``create(..., task_params=)`` instead of the optimizer."""
        if {id(p) for p in owners.shared} != {id(p) for p in self.shared_params}:
            raise ValueError("task_params were validated against other shared_params than this method's")
        owners.check_in_optimizer(self.optimizer)
        self._task_params = owners.all_task_params()

    @abc.abstractmethod
    def _combine(self, jacobian: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        """Writes the update direction of the shared parameters into ``out``.

        Returns the task weights ``w`` when :attr:`weights_task_params` is set (the
        heads then get ``Σ_k w_k ∇L_k``), else ``None``.
        """

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._timer.reset()
        self.optimizer.zero_grad(set_to_none=True)
        with torch._functorch.config.patch(donated_buffer=False):  # see "Scaling out" above
            losses = self._forward(closure)
        with self._timer.phase("backward"):
            try:
                jacobian = self._jacobian.compute(losses, retain_graph=bool(self._task_params))
            except RuntimeError as error:
                if "donated buffers" not in str(error):
                    raise
                raise RuntimeError(
                    f"{type(self).__name__} back-propagates each task's loss through the same graph, but the model's "
                    "backward was compiled with donated buffers before this method first ran it: compile it under "
                    "torch._functorch.config.patch(donated_buffer=False), or call torch._dynamo.reset() first"
                ) from error
            jacobian = self._ranks.mean(jacobian)
        with self._timer.phase("manipulation"):
            task_weights = self._combine(jacobian, self._jacobian.direction)
            self._jacobian.assign_grads()
        self._backward_task_params(losses, task_weights)
        with self._timer.phase("optimizer"):
            self.optimizer.step()
        return detached(losses)

    def _backward_task_params(self, losses: list[torch.Tensor], task_weights: Optional[torch.Tensor]) -> None:
        """One backward of the (weighted) loss sum into the task-specific parameters, averaged across ranks."""
        if not self._task_params:
            return
        with self._timer.phase("backward"):
            stacked = torch.stack(losses)
            total = stacked.sum() if task_weights is None else (task_weights.detach().to(stacked.dtype) * stacked).sum()
            grads = torch.autograd.grad(total, self._task_params, allow_unused=True, materialize_grads=True)
            if self._ranks.enabled:
                flat = self._ranks.mean(torch.cat([g.reshape(-1) for g in grads]))
                grads = flat.split([g.numel() for g in grads])
            for param, grad in zip(self._task_params, grads):
                param.grad = grad.view_as(param)


class WeightingMethod(GradientMethod):
    """A gradient method whose direction is ``d = wᵀJ`` with ``w`` a function of ``G = J Jᵀ``.

    Subclasses implement the pure :meth:`gram_weights` (a staticmethod taking the
    method's options) and :meth:`_weights` (the same with the instance's options
    and state).
    """

    @staticmethod
    @abc.abstractmethod
    def gram_weights(gram: torch.Tensor, **options: Any) -> torch.Tensor:
        """The K task weights for Gram matrix ``gram`` (K×K)."""

    @abc.abstractmethod
    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        """The K task weights of this step, with the instance's options and state."""

    @classmethod
    def aggregate(cls, jacobian: torch.Tensor, /, **options: Any) -> torch.Tensor:
        """Combines a K×P matrix of task gradients into the method's P-vector ``wᵀJ``."""
        jacobian = check_jacobian(jacobian)
        method_options = {k: v for k, v in options.items() if k not in STEP_ONLY_OPTIONS}
        weights = cls.gram_weights(gram(jacobian), **method_options)
        return weights.to(jacobian.dtype) @ jacobian

    def _combine(self, jacobian: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        weights = self._weights(gram(jacobian)).to(jacobian.dtype)
        torch.mv(jacobian.T, weights, out=out)
        return weights if self.weights_task_params else None
