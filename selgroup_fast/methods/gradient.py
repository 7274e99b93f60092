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
import dataclasses
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
    is_sharded,
)
from .base import MethodReport, MultiTaskMethod, detached
from .jacobian import JacobianMode, SharedParams, TaskJacobian, jacobian_defaults
from .nonfinite import DEFAULT_NONFINITE, tensor_state
from .step import (
    FeatureHookWriter,
    FeatureJacobian,
    FlatGradWriter,
    GradientWriter,
    GramianSource,
    JacobianSource,
    PullBackWriter,
    ShardedJacobian,
    ShardWriter,
    SharedAndHeadJacobian,
    SharedJacobian,
    TaskGradients,
    WeightedBackwardWriter,
    combine_scaled,
    weighted_total,
    weighting_inputs,
)
from .weighting import Aggregator, CombinesColumns, ParameterLayout, ReusesWeights, Weighting

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
        grad_scaler: a ``torch.amp.GradScaler`` (:mod:`selgroup_fast.methods.amp`): the task gradients are
            those of the scaled losses, unscaled before the aggregator reads them (G by s², J by s), so the
            direction is the unscaled method's; an inf/NaN in them skips the step as ``nonfinite="skip"`` does.

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
        grad_scaler: Any = None,
    ) -> None:
        super().__init__(
            optimizer,
            num_tasks,
            profile=profile,
            process_group=process_group,
            nonfinite=nonfinite,
            grad_scaler=grad_scaler,
        )
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if aggregator.num_tasks != num_tasks:
            raise ValueError(f"the aggregator is for {aggregator.num_tasks} tasks, the method for {num_tasks}")
        self.aggregator = aggregator
        self.name = aggregator.name
        self.warmup_steps, self.warmup_options = aggregator.warmup_steps, aggregator.warmup_options
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
        binds_layout = "parameter_layout" in aggregator.needs  # a state over J's columns: all of them, every step
        # The declaration's own reason first: under DDP the representation space also splits the features' J.
        if binds_layout and space != "parameters":
            raise ValueError(
                f'{self.name} keeps a state per task over the shared parameters\' coordinates: space="{space}" '
                'does not apply (the features change with every batch); use space="parameters"'
            )
        split_columns = self._sharded or (self._ranks.enabled and space == "representation")  # J split over ranks
        if split_columns and (binds_layout or not isinstance(aggregator, (Weighting, CombinesColumns))):
            raise ValueError(
                f'{self.name} with space="{space}" does not support sharded (FSDP2/DTensor) parameters or features '
                "split over ranks: it needs every coordinate of the task gradients on one rank; train it with "
                'DistributedDataParallel and space="parameters"'
            )
        if binds_layout:  # DB-MTL's, MoCo's, ExcessMTL's K×P rows, per-block GradVac's blocks: allocated here once
            aggregator.bind(ParameterLayout(tuple(p.numel() for p in shared)))
        #: Whether each step reads two batches (MoDo, SDMGrad: the cross-batch matrix J_1 J_2ᵀ; :mod:`.two_batch`).
        self._two_batches = "cross_gram" in aggregator.needs
        if self._two_batches and (space != "parameters" or self._sharded):
            raise ValueError(
                f"{self.name} reads J_1 J_2ᵀ of two batches' task gradients over the shared parameters: "
                f'space="{space}"{" and FSDP2" if self._sharded else ""} cannot serve it; use space="parameters" '
                "in one process or under DistributedDataParallel"
            )
        aggregator.load_state_dict(self._ranks.first_rank(aggregator.state_dict()))  # the same random draws
        #: Under FSDP2: how the parameters are sharded (J's columns on this rank, the reduce-scatter).
        self._shards = FSDP2Shards([*self.shared_params, *self._task_params], process_group) if self._sharded else None
        self._graph_checked = False
        self._compiled = False  # whether a compiled region makes the losses (:meth:`_check_graph`)
        self._restore_aggregator: Callable[[], None] = lambda: None  # this step's aggregator state, if skipped
        self._last_weights: torch.Tensor | None = None  # the weighting's (or reused) weights of the last step
        # The step, chosen once (docs/architecture.md §The gradient step): a compiled model, seen at the
        # first step's graph, re-composes it once (:meth:`_check_graph`).
        self._inputs = weighting_inputs(aggregator, self._ranks)
        self._reuses = aggregator if isinstance(aggregator, ReusesWeights) else None
        self._source, self._writer = self._compose()

    def _compose(self) -> tuple[JacobianSource, GradientWriter]:
        """The Jacobian source and the gradient writer of this method's setting (docs/architecture.md §The gradient step)."""
        jacobian, timer, ranks, task_params = self._jacobian, self._timer, self._ranks, self._task_params
        columns = isinstance(self.aggregator, CombinesColumns)
        if self.space == "representation":
            source = FeatureJacobian(jacobian, ranks, columns)
            return source, (FeatureHookWriter(timer) if ranks.enabled else PullBackWriter(jacobian, task_params, timer))
        if self._shards is not None:
            return (
                ShardedJacobian(jacobian, self._shards, task_params, ranks, columns),
                ShardWriter([*self.shared_params, *task_params]),
            )
        if jacobian.mode == "gramian":
            return GramianSource(jacobian), WeightedBackwardWriter(self.shared_params, task_params, timer)
        writer = FlatGradWriter(jacobian, task_params, timer)
        if task_params and (ranks.enabled or self._compiled):
            return SharedAndHeadJacobian(jacobian, task_params, ranks, self._compiled), writer
        return SharedJacobian(jacobian, ranks, keep_graph=bool(task_params)), writer

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
        elif "cross_gram" in aggregator.needs:
            gramian_refusal = f"{aggregator.name} reads J_1 J_2ᵀ of two batches, which G = J·Jᵀ does not give"
        elif "parameter_layout" in aggregator.needs:
            gramian_refusal = f"{aggregator.name} keeps a state over J's columns, which G = J·Jᵀ does not give"
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
    def reads_two_batches(self) -> bool:
        return self._two_batches

    @property
    def shared_params(self) -> list[torch.Tensor]:
        return self._jacobian.params

    @property
    def task_params(self) -> list[torch.Tensor]:
        """The task-specific parameters (``task_params=``, else the optimizer's non-shared ones)."""
        return self._task_params

    def step(
        self, closure: Callable[[], ClosureOutput], second_closure: Callable[[], ClosureOutput] | None = None
    ) -> torch.Tensor:
        """One step. The methods that read two independent batches (MoDo, SDMGrad, :attr:`reads_two_batches`)
        need ``second_closure``: a closure on another batch (e.g. ``closure`` and ``second_closure`` on the two
        halves of one batch), or ``second_closure=closure`` for a closure that draws a new batch at each call
        (``lambda: loss_of(next(batches))``); without it they raise. The weights read ``J_1 J_2ᵀ``, the update is
        the gradient of the two batches' mean losses, the returned losses that mean."""
        with retainable_compiled_graphs():
            return self._step(closure, second_closure)

    def _step(
        self, closure: Callable[[], ClosureOutput], second_closure: Callable[[], ClosureOutput] | None = None
    ) -> torch.Tensor:
        if second_closure is not None and not self._two_batches:
            raise ValueError(f"{self.name} reads one batch: step takes no second_closure")
        if self._two_batches and second_closure is None:
            raise ValueError(
                f"{self.name} reads two independent batches per step: call step(closure, second_closure) with a "
                "closure on a second batch (e.g. the two halves of one batch), or step(closure, second_closure=closure) "
                "if closure draws a new batch at each call"
            )
        self._begin_step()
        self.optimizer.zero_grad(set_to_none=True)
        losses, features = self._run_closure(closure)
        second_losses = None if second_closure is None else self._forward(second_closure)
        self._nonfinite.check(losses if second_losses is None else mean_losses(losses, second_losses))
        self._restore_aggregator = self._nonfinite.keep(self.aggregator, tensor_state(self.aggregator))
        scaled = self._scaling.losses(losses)  # what is back-propagated: s·L_k under a grad scaler
        reused = None if self._reuses is None else self._reuses.reused_weights()
        if reused is not None:  # one ordinary backward of Σ w_k L_k, the shared gradient clipped (Nash-MTL)
            self._reused_weights_step(scaled, reused, cast(ReusesWeights, self._reuses).max_norm)
            self._last_weights = reused
        else:
            self._check_graph(losses, features)
            with self._timer.phase("backward"):
                gradients = self._source(scaled, features)
                inputs = self._inputs(losses)
                if second_losses is not None:
                    scaled_second = self._scaling.losses(second_losses)
                    gradients, inputs["cross_gram"] = self._second_batch(gradients, scaled_second)
                    losses, scaled = mean_losses(losses, second_losses), mean_losses(scaled, scaled_second)
            with self._timer.phase("manipulation"):
                direction = combine_scaled(self.aggregator, gradients, inputs, self._scaling)
            self._writer(scaled, features, gradients, direction)
            self._scaling.unscale_optimizers(self.optimizer)
            self._last_weights = direction.weights
        with self._timer.phase("optimizer"):
            self._nonfinite.step(self.optimizer)
        self._restore_aggregator()
        self._scaling.update()
        return detached(losses)

    def _second_batch(
        self, first: TaskGradients, second_losses: list[torch.Tensor]
    ) -> tuple[TaskGradients, torch.Tensor]:
        """The second batch's task gradients: ``J_1 J_2ᵀ``, and the two batches' mean rows (and heads) in the buffers."""
        first_rows, first_heads = cast(torch.Tensor, first.rows).clone(), first.heads
        first_heads = None if first_heads is None else first_heads.clone()
        second = self._source(second_losses, ())  # the same buffers: the first batch's rows were copied out
        rows = cast(torch.Tensor, second.rows)
        cross = first_rows @ rows.T
        rows.add_(first_rows).mul_(0.5)
        if first_heads is not None:
            cast(torch.Tensor, second.heads).add_(first_heads).mul_(0.5)
        return second, cross

    def _reused_weights_step(self, losses: list[torch.Tensor], weights: torch.Tensor, max_norm: float) -> None:
        """A :class:`~.weighting.ReusesWeights`' step without task gradients: ONE ordinary backward of ``Σ_k w_k L_k``
        (``losses`` scaled under a grad scaler) into every parameter (DDP/FSDP2 reduce it as usual), the shared
        gradient, unscaled, clipped to ``max_norm``."""
        with self._timer.phase("backward"):
            weighted_total(losses, weights).backward()
        self._scaling.unscale_optimizers(self.optimizer)  # the clipping reads the unscaled gradient
        with self._timer.phase("manipulation"):
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.shared_params, max_norm)

    def _check_graph(self, losses: list[torch.Tensor], features: Sequence[torch.Tensor]) -> None:
        """On the host: once, whether a compiled region makes the losses (then K ordinary backwards: the step
        re-composed) and features the losses do not reach (raise); on a compiled model every step, that its backward
        may be retained. Not for FSDP2 in parameter space (its sharded step takes no retained backward through a compiled
        region)."""
        if self.space != "representation":
            if self._shards is not None:
                return
            features = ()  # the Gramian may take them as a shortcut, but the step does not need them
        if self._compiled:  # every step: the graph may run other compiled code than the last step's
            self._check_retainable(losses, features)
        if self._graph_checked:
            return
        self._compiled = graph_parameters(losses)[1]
        if self._compiled:
            # A compiled backward cannot run under vmap (AOTAutograd's runtime wrapper copies a
            # batched gradient into an unbatched buffer): K ordinary backwards, the same J.
            self._jacobian.use_loop()
            self._source, self._writer = self._compose()
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

    def report(self) -> MethodReport:
        """The skipped steps and the aggregator's task weights of the last step (a weighting's; ``None`` for
        GradDrop, which has none, and before the first step)."""
        return dataclasses.replace(super().report(), weights=self._last_weights)

    @property
    def state_bytes(self) -> int:
        """The aggregator's state (:attr:`Aggregator.state_bytes`): the method's state is the aggregator's."""
        return self.aggregator.state_bytes

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.aggregator.load_state_dict(state_dict)


def mean_losses(first: list[torch.Tensor], second: list[torch.Tensor]) -> list[torch.Tensor]:
    """The two batches' mean task losses (what a two-batch method's update descends)."""
    return [(a + b) / 2 for a, b in zip(first, second, strict=True)]


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
