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
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import torch

from ..losses import ClosureOutput
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

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self._jacobian.params

    @property
    def task_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters that are not shared (each task's own head)."""
        return self._task_params

    @abc.abstractmethod
    def _combine(self, jacobian: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        """Writes the update direction of the shared parameters into ``out``.

        Returns the task weights ``w`` when :attr:`weights_task_params` is set (the
        heads then get ``Σ_k w_k ∇L_k``), else ``None``.
        """

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._timer.reset()
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._forward(closure)
        with self._timer.phase("backward"):
            jacobian = self._jacobian.compute(losses, retain_graph=bool(self._task_params))
        with self._timer.phase("manipulation"):
            task_weights = self._combine(jacobian, self._jacobian.direction)
            self._jacobian.assign_grads()
        self._backward_task_params(losses, task_weights)
        with self._timer.phase("optimizer"):
            self.optimizer.step()
        return detached(losses)

    def _backward_task_params(self, losses: list[torch.Tensor], task_weights: Optional[torch.Tensor]) -> None:
        """One ordinary backward of the (weighted) loss sum into the task-specific parameters."""
        if not self._task_params:
            return
        with self._timer.phase("backward"):
            stacked = torch.stack(losses)
            total = stacked.sum() if task_weights is None else (task_weights.detach().to(stacked.dtype) * stacked).sum()
            torch.autograd.backward(total, inputs=self._task_params)


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
