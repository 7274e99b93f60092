"""The one training step of every gradient method (PCGrad, CAGrad, MGDA, GradDrop, IMTL-G, Aligned-MTL, Nash-MTL).

Scaling out (README "Scaling out"): under ``torch.compile`` the step runs with
``torch._functorch.config.donated_buffer`` and Inductor's FX graph cache off
(:func:`retainable_compiled_graphs`: the per-task backwards retain the graph);
under DDP every gradient is taken with ``torch.autograd.grad`` (outside DDP's reducer) and
averaged here, J with one all-reduce (K×P), the heads' gradients with a second; under FSDP2
(weightings only) one ordinary backward per task gives the sharded task gradients, the K×K
Gram matrix of the local shards is all-reduced and ``wᵀJ`` is written into each shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
import torch._functorch.config
import torch._inductor.config

from ..losses import ClosureOutput
from ..parallel import TaskParams, as_parameter_list, graph_parameters, is_sharded
from .base import MultiTaskMethod, detached
from .jacobian import JacobianMode, SharedParams, TaskJacobian, jacobian_defaults
from .weighting import Aggregator, Weighting, gram

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
        jacobian: ``"batched"`` (one vmapped backward), ``"loop"`` (K backwards) or ``"gramian"`` (the
            weightings only: ``G = J·Jᵀ`` accumulated without J, then one backward of ``Σ_k w_k L_k``);
            ``None``: the default of the shared parameters' device type
            (:data:`selgroup_fast.methods.jacobian.DEFAULTS`; a chunk_size alone means ``"batched"``).
        chunk_size: with ``"batched"``, at most this many tasks per vmapped backward (bounded peak memory);
            ``None``: all K at once.
        space: ``"parameters"`` or ``"representation"`` (the closure then returns ``(losses, features)``).
        task_params: K iterables of each task's own parameters (checked against ``shared_params``); by
            default every optimizer parameter that is not shared.
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
        jacobian: JacobianMode | None = None,
        chunk_size: int | None = None,
        space: Space = "parameters",
        task_params: Sequence[SharedParams] | None = None,
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
        shared_list = as_parameter_list(shared_params)
        jacobian, chunk_size = self._jacobian_mode(jacobian, chunk_size, aggregator, space, shared_list)
        # The K×P buffer is only needed in parameter space.
        self._jacobian = TaskJacobian(
            shared_list, num_tasks, mode=jacobian, chunk_size=chunk_size, allocate=space == "parameters"
        )
        if self._jacobian.direction.device != self.device:
            raise ValueError(f"shared_params are on {self._jacobian.direction.device}, the optimizer on {self.device}")
        shared_ids = {id(p) for p in self._jacobian.params}
        self._task_params = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad and id(p) not in shared_ids
        ]
        if task_params is not None:
            owners = TaskParams(num_tasks, self._jacobian.params, task_params)
            owners.check_in_optimizer(optimizer)
            self._task_params = owners.all_task_params()
        self._sharded = any(is_sharded(p) for p in [*self._jacobian.params, *self._task_params])
        if self._sharded and not (isinstance(aggregator, Weighting) and space == "parameters"):
            raise ValueError(
                f'{self.name} with space="{space}" does not support sharded (FSDP2/DTensor) parameters: it needs every '
                "coordinate of the task gradients on one rank; train it with DistributedDataParallel"
            )
        if self._ranks.enabled and space != "parameters":
            raise ValueError(f'space="{space}" is not supported under torch.distributed: use space="parameters"')
        aggregator.load_state_dict(self._ranks.first_rank(aggregator.state_dict()))  # the same random draws
        self._graph_checked = False

    def _jacobian_mode(
        self,
        jacobian: JacobianMode | None,
        chunk_size: int | None,
        aggregator: Aggregator,
        space: Space,
        shared: list[torch.Tensor],
    ) -> tuple[JacobianMode, int | None]:
        """``jacobian=`` and ``chunk_size=`` as given, else the device type's defaults; a Gramian that cannot be is refused."""
        gramian_refusal = None
        if not isinstance(aggregator, Weighting):
            gramian_refusal = f"{aggregator.name} needs J itself (it acts on every coordinate), not only G = J·Jᵀ"
        elif space != "parameters":
            gramian_refusal = f'space="{space}" takes the small J of the features'
        elif self._ranks.enabled or any(is_sharded(p) for p in shared):
            gramian_refusal = "under torch.distributed the Gram matrix of the global batch is not implemented"
        if jacobian is None:
            default = jacobian_defaults(shared[0].device)
            if chunk_size is not None:  # a chunk is the batched mode's
                return "batched", chunk_size
            if default.weighting == "gramian" and gramian_refusal is None:
                return "gramian", None
            return default.jacobian, default.chunk_size
        if jacobian == "gramian" and gramian_refusal is not None:
            raise ValueError(f'jacobian="gramian" does not apply: {gramian_refusal}; use "batched" or "loop"')
        return jacobian, chunk_size

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self._jacobian.params

    @property
    def task_params(self) -> list[torch.Tensor]:
        """The task-specific parameters (``task_params=``, else the optimizer's non-shared ones)."""
        return self._task_params

    def step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        with retainable_compiled_graphs():
            return self._step(closure)

    def _step(self, closure: Callable[[], ClosureOutput]) -> torch.Tensor:
        self._timer.reset()
        self.optimizer.zero_grad(set_to_none=True)
        losses, features = self._run_closure(closure)
        reused = self.aggregator.reused_weights()
        if reused is not None:  # one ordinary backward of Σ w_k L_k, the shared gradient clipped (Nash-MTL)
            with self._timer.phase("backward"):
                self._weighted_backward(losses, reused)
            with self._timer.phase("manipulation"):
                if self.aggregator.max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.shared_params, self.aggregator.max_norm)
        elif self._uses_gramian(losses):
            self._gramian_step(losses)
        elif self.space == "parameters":
            if self._sharded:
                self._sharded_step(losses)
                return self._optimizer_step(losses)
            if self._ranks.enabled and self._task_params:
                self._distributed_parameter_step(losses)
                return self._optimizer_step(losses)
            with self._timer.phase("backward"):
                jacobian = self._ranks.mean(self._parameter_jacobian(losses))
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
        return self._optimizer_step(losses)

    def _uses_gramian(self, losses: list[torch.Tensor]) -> bool:
        """Whether this step takes the Gramian path (a compiled model's first step switches it to the loop)."""
        if self._jacobian.mode == "gramian":
            self._check_graph(losses)
        return self._jacobian.mode == "gramian"

    def _gramian_step(self, losses: list[torch.Tensor]) -> None:
        """G accumulated without J (one vmapped backward), the weights from G, one ordinary backward of ``Σ w_k L_k``.

        Where the heads' weights differ from the direction's (PCGrad, CAGrad, Aligned-MTL: ones;
        Nash-MTL: α unclipped), the heads get theirs first from a backward through the heads only.
        """
        with self._timer.phase("backward"):
            gram = self._jacobian.gramian(losses, retain_graph=True)
        with self._timer.phase("manipulation"):
            weights, head_weights = cast(Weighting, self.aggregator).direction_weights(gram)
        heads_apart = bool(self._task_params) and head_weights is not weights
        if heads_apart:
            self._backward_task_params(losses, head_weights, retain_graph=True)
        with self._timer.phase("backward"):
            inputs = self.shared_params if heads_apart else [*self.shared_params, *self._task_params]
            self._weighted_total(losses, weights).backward(inputs=inputs)
            for param in inputs:  # as the other modes: zeros for a parameter no loss reaches
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

    def _optimizer_step(self, losses: list[torch.Tensor]) -> torch.Tensor:
        with self._timer.phase("optimizer"):
            self.optimizer.step()
        return detached(losses)

    def _distributed_parameter_step(self, losses: list[torch.Tensor]) -> None:
        """The DDP step: this rank's J of the shared and of the task parameters, averaged in ONE all-reduce.

        The heads' per-task gradients (K×P_h, K small backwards through the heads only) travel
        with J (K×P_s), so that the weights and the heads' update both come from the global
        batch after a single collective; the gradients are written outside DDP's reducer.
        """
        with self._timer.phase("backward"):
            shared = self._parameter_jacobian(losses)
            heads = torch.stack(
                [
                    torch.cat(
                        [
                            grad.reshape(-1)
                            for grad in torch.autograd.grad(
                                loss,
                                self._task_params,
                                retain_graph=k < len(losses) - 1,
                                allow_unused=True,
                                materialize_grads=True,
                            )
                        ]
                    )
                    for k, loss in enumerate(losses)
                ]
            ).to(shared.dtype)
            both = self._ranks.mean(torch.cat([shared, heads], dim=1))
        with self._timer.phase("manipulation"):
            jacobian, heads = both.split([shared.shape[1], heads.shape[1]], dim=1)
            _, head_weights = self.aggregator.combine(jacobian.contiguous(), out=self._jacobian.direction)
            self._jacobian.assign_grads()
            weights = torch.ones(len(losses), dtype=heads.dtype, device=heads.device)
            flat = (weights if head_weights is None else head_weights.to(heads.dtype)) @ heads
            for param, grad in zip(self._task_params, flat.split([p.numel() for p in self._task_params]), strict=True):
                param.grad = grad.view_as(param).to(param.dtype)

    def _sharded_step(self, losses: list[torch.Tensor]) -> None:
        """The FSDP2 step: per-task sharded gradients by K ordinary backwards, the global Gram matrix, ``wᵀJ`` per shard."""
        params = [*self.shared_params, *self._task_params]
        rows = []
        with self._timer.phase("backward"):
            for k, loss in enumerate(losses):
                loss.backward(retain_graph=k < len(losses) - 1)  # FSDP2 reduce-scatters: global batch, this shard
                rows.append(torch.cat([_local(p.grad, p).reshape(-1) for p in params]))
                for p in params:
                    p.grad = None
        jacobian = torch.stack(rows)
        shared_width = sum(_local(None, p).numel() for p in self.shared_params)
        with self._timer.phase("manipulation"):
            total_gram = self._ranks.sum(gram(jacobian[:, :shared_width]))  # G = Σ_ranks J_r J_rᵀ
            weights, head_weights = cast(Weighting, self.aggregator).direction_weights(
                total_gram
            )  # checked at construction
            if head_weights is None:
                head_weights = torch.ones_like(weights)
            flat = torch.cat(
                [
                    weights.to(jacobian.dtype) @ jacobian[:, :shared_width],
                    head_weights.to(jacobian.dtype) @ jacobian[:, shared_width:],
                ]
            )
            offset = 0
            for p in params:
                p.grad = torch.zeros_like(p)
                local = _local(p.grad, p)
                local.copy_(flat[offset : offset + local.numel()].view_as(local))
                offset += local.numel()

    def _check_graph(self, losses: list[torch.Tensor]) -> None:
        """Once: a compiled backward cannot run under vmap (AOTAutograd's runtime wrapper copies a batched
        gradient into an unbatched buffer), so the vectorised modes become K ordinary backwards, the same J."""
        if not self._graph_checked:  # once: the graph walk runs on the host
            self._graph_checked = True
            if self._jacobian.mode != "loop" and graph_parameters(losses)[1]:
                self._jacobian.use_loop()

    def _parameter_jacobian(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """J of this rank's losses w.r.t. the shared parameters; a compiled backward that cannot be retained is named."""
        self._check_graph(losses)
        try:
            return self._jacobian.compute(losses, retain_graph=bool(self._task_params))
        except RuntimeError as error:
            if "donated buffers" not in str(error):
                raise
            raise RuntimeError(
                f"{self.name} back-propagates each task's loss through the same graph, but the model's backward "
                "was compiled with donated buffers before this method first ran it: compile it under "
                "torch._functorch.config.patch(donated_buffer=False), or call torch._dynamo.reset() first"
            ) from error

    @staticmethod
    def _weighted_total(losses: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
        """``Σ_k w_k L_k`` (``Σ_k L_k`` without weights)."""
        stacked = torch.stack(losses)
        return stacked.sum() if weights is None else (weights.detach().to(stacked.dtype) * stacked).sum()

    def _weighted_backward(self, losses: list[torch.Tensor], weights: torch.Tensor) -> None:
        """One ordinary backward of ``Σ_k w_k L_k`` into every parameter (DDP/FSDP2 reduce it as usual)."""
        self._weighted_total(losses, weights).backward()

    def _backward_task_params(
        self, losses: list[torch.Tensor], weights: torch.Tensor | None, retain_graph: bool
    ) -> None:
        """The task-specific parameters' gradients of ``Σ_k w_k L_k`` (one process; DDP: :meth:`_distributed_parameter_step`)."""
        if not self._task_params:
            return
        with self._timer.phase("backward"):
            grads = torch.autograd.grad(
                self._weighted_total(losses, weights),
                self._task_params,
                retain_graph=retain_graph,
                allow_unused=True,
                materialize_grads=True,
            )
            for param, grad in zip(self._task_params, grads, strict=False):
                param.grad = grad.view_as(param)

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.aggregator.load_state_dict(state_dict)


@contextlib.contextmanager
def retainable_compiled_graphs() -> Iterator[None]:
    """Makes what ``torch.compile`` compiles inside it safe to back-propagate several times.

    The gradient methods back-propagate each task's loss through one graph (``retain_graph``).
    AOTAutograd refuses that for a backward compiled with donated buffers (saved tensors
    its code may overwrite), so they are turned off; and Inductor's FX graph cache would
    hand back a backward compiled earlier WITH donated buffers (its key does not tell them
    apart, torch 2.14): it overwrites the saved tensors without the refusal, and the next
    task's gradient is silently wrong (tested in tests/test_scaling.py with Inductor). Both
    are configuration patches, in force while the step runs (compilation is lazy: the
    backward is compiled at its first call).
    """
    with torch._functorch.config.patch(donated_buffer=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def _local(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``grad`` (zeros shaped like ``param``'s shard when there is none)."""
    if grad is None:
        return torch.zeros_like(cast(Any, param).to_local() if is_sharded(param) else param)
    return cast(Any, grad).to_local() if is_sharded(grad) else grad
