"""The one training step of every gradient method (PCGrad, CAGrad, MGDA, GradDrop, IMTL-G, Aligned-MTL, Nash-MTL).

Scaling out (docs/scaling.md): under ``torch.compile`` the step runs with
``torch._functorch.config.donated_buffer`` and Inductor's FX graph cache off
(:func:`retainable_compiled_graphs`: the per-task backwards retain the graph), and the
heads' gradients come from the same K backwards as J (a compiled backward computes them anyway);
under DDP every gradient is taken with ``torch.autograd.grad`` (outside DDP's reducer) and
averaged here, J and the heads' gradients in one all-reduce (K×P); under FSDP2 (weightings
and GradDrop) the K task gradients are taken w.r.t. the unsharded parameters, reduce-scattered
in one collective (K×P), the K×K Gram matrix of the local shards is all-reduced and ``wᵀJ``
is written into each shard (GradDrop: each rank combines its own columns, with their global
indices). With ``space="representation"`` under either, the K×K Gram matrix of the features
is all-reduced and ONE ordinary backward, which DDP/FSDP2 reduce as for GD, carries the
direction (docs/algorithm.md §Representation space across ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import torch
import torch._functorch.config
import torch._inductor.config

from ..losses import ClosureOutput
from ..parallel import (
    FSDP2Shards,
    TaskParams,
    as_parameter_list,
    compiled_backwards,
    graph_parameters,
    graph_reaches,
    graph_separates,
    is_sharded,
)
from .base import MultiTaskMethod, detached
from .graddrop import GradDrop
from .jacobian import JacobianMode, SharedParams, TaskJacobian, gradients_task_by_task, jacobian_defaults
from .nonfinite import DEFAULT_NONFINITE, tensor_state
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
        process_group: the ``torch.distributed`` group training together, which the method's
            collectives go through (default: the world group when initialised).
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"`` (:mod:`selgroup_fast.methods.nonfinite`);
            a skipped step also leaves the aggregator's tensor state (Nash-MTL's α) as it was.

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
        process_group: Any = None,
        nonfinite: str = DEFAULT_NONFINITE,
    ) -> None:
        super().__init__(optimizer, num_tasks, profile=profile, process_group=process_group, nonfinite=nonfinite)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if aggregator.num_tasks != num_tasks:
            raise ValueError(f"the aggregator is for {aggregator.num_tasks} tasks, the method for {num_tasks}")
        self.aggregator = aggregator
        self.name = aggregator.name
        self.space = space
        shared = as_parameter_list(shared_params)
        jacobian, chunk_size = self._jacobian_mode(jacobian, chunk_size, aggregator, space, shared)
        # The K×P buffer is only needed in parameter space, and not under FSDP2 (K × this rank's shards).
        self._jacobian = TaskJacobian(
            shared,
            num_tasks,
            mode=jacobian,
            chunk_size=chunk_size,
            allocate=space == "parameters" and not any(is_sharded(p) for p in shared),
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
        split_columns = self._sharded or (self._ranks.enabled and space == "representation")  # J split over ranks
        if split_columns and not isinstance(aggregator, (Weighting, GradDrop)):
            raise ValueError(
                f'{self.name} with space="{space}" does not support sharded (FSDP2/DTensor) parameters or features '
                "split over ranks: it needs every coordinate of the task gradients on one rank; train it with "
                'DistributedDataParallel and space="parameters"'
            )
        aggregator.load_state_dict(self._ranks.first_rank(aggregator.state_dict()))  # the same random draws
        #: Under FSDP2: how the parameters are sharded (J's columns on this rank, the reduce-scatter).
        self._shards = FSDP2Shards([*self.shared_params, *self._task_params], process_group) if self._sharded else None
        self._graph_checked = False
        self._compiled = False  # whether a compiled region makes the losses (:meth:`_check_graph`)
        self._gramian_through: bool | None = None  # whether G starts from the features (:meth:`_gramian_step`)
        self._task_jacobian = torch.empty(0)  # compiled models: the heads' per-task gradients (K×P_h), allocated once
        self._restore_aggregator: Callable[[], None] = lambda: None  # this step's aggregator state, if skipped

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
            gramian_pays = aggregator.num_tasks >= default.weighting_from_tasks
            if default.weighting == "gramian" and gramian_refusal is None and gramian_pays:
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
        self._begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        losses, features = self._run_closure(closure)
        self._nonfinite.check(losses)
        self._restore_aggregator = self._nonfinite.keep(self.aggregator, tensor_state(self.aggregator))
        reused = self.aggregator.reused_weights()
        if reused is not None:  # one ordinary backward of Σ w_k L_k, the shared gradient clipped (Nash-MTL)
            with self._timer.phase("backward"):
                self._weighted_backward(losses, reused)
            with self._timer.phase("manipulation"):
                if self.aggregator.max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.shared_params, self.aggregator.max_norm)
        elif self._uses_gramian(losses):
            self._gramian_step(losses, features)
        elif self.space == "parameters":
            if self._sharded:
                self._sharded_step(losses)
                return self._optimizer_step(losses)
            self._check_graph(losses)
            if self._task_params and (self._ranks.enabled or self._compiled):
                self._parameter_step_with_heads(losses)
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
            self._check_graph(losses, features)
            if self._ranks.enabled:
                self._distributed_representation_step(losses, features)
                return self._optimizer_step(losses)
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

    def _gramian_step(self, losses: list[torch.Tensor], features: Sequence[torch.Tensor]) -> None:
        """G accumulated without J (one vmapped backward), the weights from G, one ordinary backward of ``Σ w_k L_k``.

        Where the closure returns the shared features and every path from the losses to the
        shared parameters passes through them (checked once, on the host), the vectorised
        backward starts from the features (:meth:`TaskJacobian.gramian`'s ``through``). Where
        the heads' weights differ from the direction's (PCGrad, CAGrad, Aligned-MTL: ones;
        Nash-MTL: α unclipped), the heads get theirs first from a backward through the heads only.
        """
        if self._gramian_through is None:
            self._gramian_through = bool(features) and graph_separates(losses, features, self.shared_params)
        with self._timer.phase("backward"):
            gram = self._jacobian.gramian(losses, retain_graph=True, through=features if self._gramian_through else ())
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
            self._nonfinite.step(self.optimizer)
        self._restore_aggregator()
        return detached(losses)

    def _parameter_step_with_heads(self, losses: list[torch.Tensor]) -> None:
        """The step that needs the heads' per-task gradients as rows beside J: DDP, a compiled model.

        Under DDP the heads' per-task gradients (K×P_h) travel with J (K×P_s), so that the
        weights and the heads' update both come from the global batch after a single all-reduce;
        the gradients are written outside DDP's reducer. On a compiled model they come from the
        same K backwards as J (:meth:`_jacobian_and_heads`).
        """
        with self._timer.phase("backward"):
            shared, heads = self._jacobian_and_heads(losses)
            if self._ranks.enabled:
                both = self._ranks.mean(torch.cat([shared, heads], dim=1))
                shared, heads = both.split([shared.shape[1], heads.shape[1]], dim=1)
                shared = shared.contiguous()
        with self._timer.phase("manipulation"):
            _, head_weights = self.aggregator.combine(shared, out=self._jacobian.direction)
            self._jacobian.assign_grads()
            self._assign_task_grads(heads, head_weights)

    def _jacobian_and_heads(self, losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """J of this rank's losses (K×P_s) and the task parameters' per-task gradients (K×P_h).

        Eagerly: J in the Jacobian's mode, then K small backwards through the heads only. On a
        compiled model AOTAutograd compiles ONE backward per compiled region, which computes the
        gradient of every parameter of the region whatever ``torch.autograd.grad`` asks for: a
        separate backward for the heads would run the whole model's backward once more (K + 1
        instead of K; benchmarks/results/compile_cpu.md), so each task's backward asks for the
        shared and the task parameters at once.
        """
        if not self._compiled:
            shared = self._parameter_jacobian(losses)
            width = sum(p.numel() for p in self._task_params)
            heads = gradients_task_by_task(losses, self._task_params, False, shared.new_empty(len(losses), width))
            return shared, heads
        num_shared, last = len(self.shared_params), len(losses) - 1
        if self._task_jacobian.numel() == 0:
            width = sum(p.numel() for p in self._task_params)
            self._task_jacobian = self._jacobian.matrix.new_empty(len(losses), width)
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss,
                [*self.shared_params, *self._task_params],
                retain_graph=k < last,
                allow_unused=True,
                materialize_grads=True,
            )
            torch.cat([g.reshape(-1) for g in grads[:num_shared]], out=self._jacobian.matrix[k])
            torch.cat([g.reshape(-1) for g in grads[num_shared:]], out=self._task_jacobian[k])
        return self._jacobian.matrix, self._task_jacobian

    def _assign_task_grads(self, task_jacobian: torch.Tensor, head_weights: torch.Tensor | None) -> None:
        """Makes ``Σ_k w_k t_k`` (``t_k``: row k of ``task_jacobian``) the task parameters' ``.grad`` (``w = 1`` without weights)."""
        weights = torch.ones(len(task_jacobian), dtype=task_jacobian.dtype, device=task_jacobian.device)
        flat = (weights if head_weights is None else head_weights.to(task_jacobian.dtype)) @ task_jacobian
        for param, grad in zip(self._task_params, flat.split([p.numel() for p in self._task_params]), strict=True):
            param.grad = grad.view_as(param).to(param.dtype)

    def _distributed_representation_step(self, losses: list[torch.Tensor], features: Sequence[torch.Tensor]) -> None:
        """DDP and FSDP2 with ``space="representation"`` (docs/algorithm.md §Representation space across ranks).

        This rank's K×Z_r Jacobian of the features (one backward through the heads), the
        global batch's direction restricted to this rank's samples (:meth:`_global_feature_cotangent`:
        one all-reduce of K×K, none for GradDrop), then ONE ordinary backward of ``Σ_k h_k L_k``
        whose gradient at the features is replaced by that direction (a tensor hook): the heads
        get ``h_k ∇L_k``, the encoder the direction pulled back, and DDP's reducer or FSDP2's
        reduce-scatter averages both across the ranks as for GD.
        """
        with self._timer.phase("backward"):
            jacobian = self._jacobian.of_features(losses, features)
        with self._timer.phase("manipulation"):
            cotangent, head_weights = self._global_feature_cotangent(jacobian, features)
        with self._timer.phase("backward"):
            handles, offset = [], 0
            for feature in features:
                part = cotangent[offset : offset + feature.numel()].view_as(feature).to(feature.dtype)
                handles.append(feature.register_hook(lambda _gradient, part=part: part))
                offset += feature.numel()
            try:
                self._weighted_total(losses, head_weights).backward()
            finally:
                for handle in handles:
                    handle.remove()

    def _global_feature_cotangent(
        self, jacobian: torch.Tensor, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cotangent of this rank's features whose ranks' mean is the global batch's direction, and the heads' weights.

        The global batch's loss is the ranks' mean (DDP's and FSDP2's convention), so its
        feature Jacobian holds the ranks' ``J_r / W`` side by side and its Gram matrix is
        ``Σ_r G_r / W²`` (one all-reduce of K×K). A weighting's direction on this rank's
        samples is then ``wᵀJ_r / W``: the cotangent ``wᵀJ_r``, which the reducer averages.
        GradDrop combines each column alone (its purity is scale-free and its sum linear), so
        it needs no collective: it runs on ``J_r``, drawing with each column's index in the
        global features (the ranks' equal-sized, batch-first features end to end in rank order).
        """
        if isinstance(self.aggregator, GradDrop):
            runs, first_column = [], 0
            for feature in features:
                runs.append((first_column + self._ranks.rank * feature.numel(), feature.numel()))
                first_column += self._ranks.world_size * feature.numel()
            return self.aggregator.combine_columns(jacobian, runs), None
        total = self._ranks.sum(gram(jacobian)).div_(self._ranks.world_size**2)
        weights, head_weights = cast(Weighting, self.aggregator).direction_weights(total)  # a Weighting otherwise
        return weights.to(jacobian.dtype) @ jacobian, head_weights

    def _sharded_step(self, losses: list[torch.Tensor]) -> None:
        """The FSDP2 step: the per-task gradients of this rank's shards in ONE reduce-scatter, then the direction.

        The K task gradients are taken with ``torch.autograd.grad`` w.r.t. the unsharded parameters
        of the graph (FSDP2 re-gathers them as usual but, with no ``.grad`` written, reduces
        nothing), stacked K×P and reduce-scattered once: each rank gets the global batch's K rows
        of its columns. A weighting then needs the global Gram matrix (``G = Σ_ranks J_r J_rᵀ``,
        one K×K all-reduce) and writes ``wᵀJ_r``; GradDrop, column by column, needs no other
        collective: each rank combines its columns, drawing with their global indices. The
        direction goes into the sharded ``.grad``, which FSDP2 does not reduce again.
        """
        params = [*self.shared_params, *self._task_params]
        with self._timer.phase("backward"):
            jacobian = self._sharded_task_gradients(losses, params)
        shared_width = sum(cast(Any, p).to_local().numel() for p in self.shared_params)  # all DTensors (FSDP2Shards)
        shared, heads = jacobian[:, :shared_width], jacobian[:, shared_width:]
        with self._timer.phase("manipulation"):
            if isinstance(self.aggregator, GradDrop):
                runs = cast(FSDP2Shards, self._shards).column_runs(len(self.shared_params))
                direction, head_weights = self.aggregator.combine_columns(shared, runs), None
            else:  # a Weighting (checked at construction)
                total_gram = self._ranks.sum(gram(shared))  # G = Σ_ranks J_r J_rᵀ
                weights, head_weights = cast(Weighting, self.aggregator).direction_weights(total_gram)
                direction = weights.to(jacobian.dtype) @ shared
            flat = torch.cat(
                [direction, heads.sum(0) if head_weights is None else head_weights.to(heads.dtype) @ heads]
            )
            offset = 0
            for p in params:
                p.grad = torch.zeros_like(p)
                local = cast(Any, p.grad).to_local()
                local.copy_(flat[offset : offset + local.numel()].view_as(local))
                offset += local.numel()

    def _sharded_task_gradients(self, losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
        """J of the global batch, this rank's columns of ``params`` (K × Σ local numel): ONE reduce-scatter."""
        shards = cast(FSDP2Shards, self._shards)
        unsharded = shards.unsharded
        # Batched: one vmapped backward per chunk of tasks, FSDP2 re-gathering each unit once per chunk;
        # loop: K backwards, FSDP2 re-gathering a unit for each task's backward that reaches it.
        flat = torch.empty(
            len(losses), sum(p.numel() for p in unsharded), dtype=unsharded[0].dtype, device=unsharded[0].device
        )
        self._jacobian.gradients(losses, unsharded, False, flat)
        sizes = [p.numel() for p in unsharded]
        grads = [block.to(param.dtype) for block, param in zip(flat.split(sizes, dim=1), params, strict=True)]
        return shards.reduce_scatter(grads).div_(shards.world)

    def _parameter_jacobian(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """J of this rank's losses w.r.t. the shared parameters."""
        self._check_graph(losses)
        return self._jacobian.compute(losses, retain_graph=bool(self._task_params))

    def _check_graph(self, losses: list[torch.Tensor], features: Sequence[torch.Tensor] = ()) -> None:
        """On the host: once, whether a compiled region makes the losses (then K ordinary backwards) and features the
        losses do not reach (raise); on a compiled model every step, that its backward may be retained."""
        if self._compiled:  # every step: the graph may run other compiled code than the last step's
            self._check_retainable(losses, features)
        if self._graph_checked:
            return
        self._compiled = graph_parameters(losses)[1]
        if self._compiled:
            # A compiled backward cannot run under vmap (AOTAutograd's runtime wrapper copies a
            # batched gradient into an unbatched buffer): K ordinary backwards, the same J.
            self._jacobian.use_loop()
        for i, reached in enumerate(graph_reaches(losses, features)):
            if not reached and features[i].requires_grad:  # a detached one: TaskJacobian.of_features says so
                raise ValueError(
                    f"the losses do not back-propagate through features {i}: return the tensor the heads are computed "
                    "from (a torch.compile'd model that returns it beside the predictions hides that edge: compile "
                    "the encoder and the heads separately)"
                )
        self._graph_checked = all(feature.requires_grad for feature in features)  # checked again after an error
        if self._compiled:
            self._check_retainable(losses, features)

    def _check_retainable(self, losses: list[torch.Tensor], features: Sequence[torch.Tensor]) -> None:
        """Raises where a compiled region that this step back-propagates several times cannot be (docs/scaling.md, "torch.compile").

        A backward compiled with donated buffers overwrites the tensors the forward saved: the next
        task's backward through the same graph would silently read them (torch's own check is off
        inside :func:`retainable_compiled_graphs`). Torch.compile shares compiled code between
        instances of a model class (and, through its caches, across ``torch.compiler.reset()``),
        so a region trained before with one backward per step (GD, the selective update, a
        loss-weighting method, the user's loop) arrives here with such a backward. A backward
        compiled in this step must not come from Inductor's FX graph cache, whose key does not
        tell donated buffers apart: an environment variable that forces it on is refused.
        """
        regions = compiled_backwards(losses, features)
        if any(donates for _, donates in regions):
            raise RuntimeError(
                f"{self.name} back-propagates each task's loss through the compiled model's graph, but its backward "
                "was compiled earlier in this process for one backward per step (with donated buffers: by another "
                "method or training loop, maybe on another instance of the same model class, whose compiled code "
                f"torch.compile reuses): call torch.compiler.reset() before training with {self.name}"
            )
        if not all(compiled for compiled, _ in regions) and torch._inductor.config.fx_graph_cache:
            raise RuntimeError(
                f"{self.name} compiles the model's backward with Inductor's FX graph cache off (the cache can hand "
                "back a backward compiled with donated buffers, wrong here), but the environment variable "
                "TORCHINDUCTOR_FX_GRAPH_CACHE forces it on: unset it"
            )

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
        """The task-specific parameters' gradients of ``Σ_k w_k L_k`` (one process; DDP and compiled models: :meth:`_parameter_step_with_heads`)."""
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

    The gradient methods back-propagate each task's loss through one graph (``retain_graph``),
    which a backward compiled with donated buffers (saved tensors its code may overwrite)
    does not allow: they are turned off, so that no backward compiled here donates, whether
    its first call retains the graph or not. Inductor's FX graph cache, local and remote,
    is off too: it would hand back a backward compiled earlier WITH donated buffers (its key
    does not tell them apart, torch 2.14), and every task gradient after the first would be
    silently wrong (tested in tests/test_scaling.py with Inductor); AOTAutograd's cache, which
    needs it, is then off as well. These patches reach only what is compiled while the step
    runs (the forward in the closure; the backward, at its first call): code compiled before
    is checked by :meth:`GradientMethod._check_retainable`, which also refuses an environment
    variable that forces the FX graph cache on (a patch cannot turn it off).
    """
    with (
        torch._functorch.config.patch(donated_buffer=False),
        torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
    ):
        yield
