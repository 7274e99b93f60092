"""The parts a gradient method's training step is composed of, chosen once (:class:`~.gradient.GradientMethod`).

As ``torch.optim.Adam`` picks its single-tensor, multi-tensor or fused implementation once, a
:class:`~.gradient.GradientMethod` composes its step at construction (docs/architecture.md
§The gradient step) from

* a **Jacobian source** (``source(losses, features) -> TaskGradients``): what the K task
  gradients are made available as. :class:`SharedJacobian` (J of the shared parameters, batched
  or loop, the ranks' mean under DDP), :class:`SharedAndHeadJacobian` (J beside the heads'
  per-task rows: DDP, a compiled model), :class:`GramianSource` (G only, J never held),
  :class:`FeatureJacobian` (J of the shared features; across ranks with the global batch's G),
  :class:`ShardedJacobian` (FSDP2: this rank's columns of the global batch's J, one reduce-scatter);
* the **aggregator** (:func:`combine`: the direction, or a weighting's weights, and the heads'
  weights), given what its ``needs`` declares (:func:`weighting_inputs`);
* a **gradient writer** (``writer(losses, features, task_gradients, direction)``): what becomes
  the parameters' ``.grad``. :class:`FlatGradWriter` (the direction's flat buffer, whose slices
  are the shared ``.grad``), :class:`WeightedBackwardWriter` (one backward of ``Σ_k w_k L_k``),
  :class:`PullBackWriter` (the feature direction pulled back through the encoder),
  :class:`FeatureHookWriter` (one ordinary backward whose feature gradient is the direction:
  DDP/FSDP2 reduce it), :class:`ShardWriter` (FSDP2's sharded ``.grad``).

Each part is a small object, tested alone (tests/test_gradient_step.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from ..parallel import FSDP2Shards, RankAgreement, graph_separates
from ..profiling import PhaseTimer
from .amp import GradScaling
from .jacobian import TaskJacobian, gradients_task_by_task
from .weighting import Aggregator, CombinesColumns, Weighting, gram

Losses = list[torch.Tensor]
Features = Sequence[torch.Tensor]


@dataclass
class TaskGradients:
    """What a Jacobian source hands the aggregator.

    ``rows``: the K task gradients over the coordinates this rank writes (K×N; ``None`` for the
    Gramian, which never forms them). ``gram``: the K×K Gram matrix of the global batch where the
    source computed it (Gramian; columns split over ranks), else ``None`` (``rows·rowsᵀ``).
    ``heads``: the task parameters' per-task gradients (K×P_h) where they travel with ``rows``,
    else ``None`` (the heads get a backward of their own). ``columns``: where ``rows`` holds some
    columns of a wider J, their (first global column, width) runs (GradDrop's draws).
    """

    rows: torch.Tensor | None
    gram: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    columns: list[tuple[int, int]] | None = None
    #: Where the direction is written (the flat buffer whose slices are the shared ``.grad``); ``None``: a new tensor.
    out: torch.Tensor | None = None


@dataclass
class Direction:
    """The aggregator's answer: the direction over ``rows``' coordinates (``None`` for the Gramian), the
    direction's task weights (weightings only) and the heads' weights (``None``: all ones)."""

    vector: torch.Tensor | None
    weights: torch.Tensor | None
    head_weights: torch.Tensor | None


class JacobianSource(Protocol):
    def __call__(self, losses: Losses, features: Features) -> TaskGradients: ...


class GradientWriter(Protocol):
    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None: ...


def weighted_total(losses: Losses, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ_k w_k L_k`` (``Σ_k L_k`` without weights)."""
    stacked = torch.stack(losses)
    return stacked.sum() if weights is None else (weights.detach().to(stacked.dtype) * stacked).sum()


def backward_task_params(
    losses: Losses, weights: torch.Tensor | None, task_params: list[torch.Tensor], retain_graph: bool
) -> None:
    """The task parameters' ``.grad``: the gradient of ``Σ_k w_k L_k`` (zeros where no loss reaches)."""
    if not task_params:
        return
    grads = torch.autograd.grad(
        weighted_total(losses, weights),
        task_params,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    for param, grad in zip(task_params, grads, strict=True):
        param.grad = grad.view_as(param)


def weighting_inputs(aggregator: Aggregator, ranks: RankAgreement) -> Callable[[Losses], dict[str, torch.Tensor]]:
    """What the step hands the aggregator at each step besides J or G, chosen once from its ``needs`` (nothing for
    G-only methods).

    ``"losses"``: the K detached losses of the global batch (the ranks' mean). ``"cross_gram"`` is added by the
    two-batch step (:meth:`~.gradient.GradientMethod.step` with a second closure); ``"parameter_layout"`` is bound
    once, when the step is built (:meth:`~.weighting.Aggregator.bind`).
    """
    if "losses" not in aggregator.needs:
        return lambda losses: {}
    return lambda losses: {"losses": ranks.mean(torch.stack([loss.detach() for loss in losses]))}


def combine(aggregator: Aggregator, gradients: TaskGradients, inputs: dict[str, torch.Tensor]) -> Direction:
    """The aggregator on what the source gave: a weighting's ``wᵀ rows`` (into ``gradients.out`` when given),
    GradDrop's columns with their global indices, or the aggregator's own ``combine``."""
    rows, out = gradients.rows, gradients.out
    if isinstance(aggregator, Weighting):
        total = gradients.gram
        if total is None and aggregator.reads_gram:
            total = gram(cast(torch.Tensor, rows))
        weights, head_weights = aggregator.direction_weights(total, **inputs)
        if rows is None:
            return Direction(None, weights, head_weights)
        vector = weights.to(rows.dtype) @ rows if out is None else torch.mv(rows.T, weights.to(rows.dtype), out=out)
        return Direction(vector, weights, head_weights)
    rows = cast(torch.Tensor, rows)  # only the Gramian (a weighting's) has none
    if gradients.columns is not None:  # split columns: a CombinesColumns (refused at construction otherwise)
        return Direction(cast(CombinesColumns, aggregator).combine_columns(rows, gradients.columns), None, None)
    if inputs:  # the losses, where the aggregator declares them (DB-MTL, MoCo)
        vector, head_weights = aggregator.combine_losses(rows, inputs["losses"], out=out)
    else:
        vector, head_weights = aggregator.combine(rows, out=out)
    return Direction(vector, None, head_weights)


def combine_scaled(
    aggregator: Aggregator, gradients: TaskGradients, inputs: dict[str, torch.Tensor], scaling: GradScaling
) -> Direction:
    """:func:`combine` on the task gradients of the losses ``s·L_k`` (a grad scaler; :mod:`.amp`), which the
    aggregator reads unscaled, an inf/NaN in them recorded: the direction is the unscaled method's, times ``s``
    (what the writers make ``.grad`` of must be scaled, as the heads' backward of ``s·L_k`` is, until the
    optimizer's ``unscale_``). A weighting reads G or A (K×K) only: ``G / s²`` (only where it reads G), ``A / s²``,
    its weights then weight the scaled rows. Any other aggregator reads J: ``J / s`` in place (one pass over K×P),
    its direction times ``s``."""
    if not scaling.enabled:
        return combine(aggregator, gradients, inputs)
    if isinstance(aggregator, Weighting):
        if aggregator.reads_gram:
            if gradients.gram is None:
                gradients.gram = gram(cast(torch.Tensor, gradients.rows))
            scaling.unscale_(gradients.gram, power=2)
        if "cross_gram" in inputs:
            scaling.unscale_(inputs["cross_gram"], power=2)
        return combine(aggregator, gradients, inputs)
    scaling.unscale_(cast(torch.Tensor, gradients.rows))
    direction = combine(aggregator, gradients, inputs)
    scaling.rescale_(cast(torch.Tensor, direction.vector))
    return direction


# --------------------------------------------------------------------------- Jacobian sources


@dataclass
class SharedJacobian:
    """J of the shared parameters in the Jacobian's mode (batched or loop), the ranks' mean under DDP.

    The graph is kept when the heads' backward follows (``keep_graph``).
    """

    jacobian: TaskJacobian
    ranks: RankAgreement
    keep_graph: bool

    def __call__(self, losses: Losses, features: Features) -> TaskGradients:
        rows = self.ranks.mean(self.jacobian.compute(losses, retain_graph=self.keep_graph))
        return TaskGradients(rows, out=self.jacobian.direction)


@dataclass
class SharedAndHeadJacobian:
    """J (K×P_s) and the task parameters' per-task gradients (K×P_h): DDP, a compiled model.

    Under DDP both travel in ONE all-reduce, so that the weights and the heads' update come
    from the global batch; the gradients are taken outside DDP's reducer. Eagerly: J in the
    Jacobian's mode, then K small backwards through the heads only. On a compiled model
    AOTAutograd compiles ONE backward per compiled region, which computes the gradient of
    every parameter of the region whatever ``torch.autograd.grad`` asks for: a separate
    backward for the heads would run the whole model's backward once more (K + 1 instead of
    K; benchmarks/results/compile_cpu.md), so each task's backward asks for both at once.
    """

    jacobian: TaskJacobian
    task_params: list[torch.Tensor]
    ranks: RankAgreement
    compiled: bool

    def __post_init__(self) -> None:
        width = sum(p.numel() for p in self.task_params)
        self._heads = self.jacobian.matrix.new_empty(self.jacobian.num_tasks, width)  # allocated once

    def __call__(self, losses: Losses, features: Features) -> TaskGradients:
        shared, heads = self._compiled_rows(losses) if self.compiled else self._eager_rows(losses)
        if self.ranks.enabled:
            both = self.ranks.mean(torch.cat([shared, heads], dim=1))
            shared, heads = both.split([shared.shape[1], heads.shape[1]], dim=1)
            shared = shared.contiguous()
        return TaskGradients(shared, heads=heads, out=self.jacobian.direction)

    def _eager_rows(self, losses: Losses) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.jacobian.compute(losses, retain_graph=True)
        return shared, gradients_task_by_task(losses, self.task_params, False, self._heads)

    def _compiled_rows(self, losses: Losses) -> tuple[torch.Tensor, torch.Tensor]:
        params, num_shared, last = self.jacobian.params, len(self.jacobian.params), len(losses) - 1
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, [*params, *self.task_params], retain_graph=k < last, allow_unused=True, materialize_grads=True
            )
            torch.cat([g.reshape(-1) for g in grads[:num_shared]], out=self.jacobian.matrix[k])
            torch.cat([g.reshape(-1) for g in grads[num_shared:]], out=self._heads[k])
        return self.jacobian.matrix, self._heads


@dataclass
class GramianSource:
    """G accumulated without J (:meth:`TaskJacobian.gramian`, one vmapped backward; the graph kept for the writer).

    Where the closure returns the shared features and every path from the losses to the shared
    parameters passes through them (checked once, on the host), the vectorised backward starts
    from the features (:meth:`TaskJacobian.gramian`'s ``through``).
    """

    jacobian: TaskJacobian
    _through: bool | None = None

    def __call__(self, losses: Losses, features: Features) -> TaskGradients:
        if self._through is None:
            self._through = bool(features) and graph_separates(losses, features, self.jacobian.params)
        total = self.jacobian.gramian(losses, retain_graph=True, through=features if self._through else ())
        return TaskGradients(None, gram=total)


@dataclass
class FeatureJacobian:
    """J of the shared features (K×Z), the graph kept for the writer (Sener & Koltun, NeurIPS 2018, §3.3).

    Across ranks (``ranks.enabled``; docs/algorithm.md §Representation space across ranks) the
    global batch's feature Jacobian holds the ranks' ``J_r / W`` side by side: a weighting gets its
    Gram matrix ``Σ_r G_r / W²`` (one all-reduce of K×K), GradDrop (``columns``) each column's
    index in the global features (the ranks' equal-sized, batch-first features end to end in
    rank order), and needs no collective.
    """

    jacobian: TaskJacobian
    ranks: RankAgreement
    columns: bool

    def __call__(self, losses: Losses, features: Features) -> TaskGradients:
        if not features:
            raise ValueError(
                'space="representation" needs the closure to return (losses, features), features being the '
                "shared representation (the encoder's output)"
            )
        rows = self.jacobian.of_features(losses, features)
        if not self.ranks.enabled:
            return TaskGradients(rows)
        if self.columns:
            runs, first_column = [], 0
            for feature in features:
                runs.append((first_column + self.ranks.rank * feature.numel(), feature.numel()))
                first_column += self.ranks.world_size * feature.numel()
            return TaskGradients(rows, columns=runs)
        return TaskGradients(rows, gram=self.ranks.sum(gram(rows)).div_(self.ranks.world_size**2))


@dataclass
class ShardedJacobian:
    """FSDP2: this rank's columns of the global batch's J (shared and task parameters) in ONE reduce-scatter.

    The K task gradients are taken with ``torch.autograd.grad`` w.r.t. the unsharded parameters
    of the graph (FSDP2 re-gathers them as usual but, with no ``.grad`` written, reduces nothing),
    stacked K×P and reduce-scattered once: each rank gets the global batch's K rows of its columns.
    A weighting then gets the global Gram matrix (``G = Σ_ranks J_r J_rᵀ``, one K×K all-reduce);
    GradDrop (``columns``) the columns' global indices, and needs no other collective.
    """

    jacobian: TaskJacobian
    shards: FSDP2Shards
    task_params: list[torch.Tensor]
    ranks: RankAgreement
    columns: bool

    def __call__(self, losses: Losses, features: Features) -> TaskGradients:
        local = self.task_gradients(losses, [*self.jacobian.params, *self.task_params])
        shared_width = sum(cast(Any, p).to_local().numel() for p in self.jacobian.params)  # all DTensors
        shared, heads = local[:, :shared_width], local[:, shared_width:]
        if self.columns:
            return TaskGradients(shared, heads=heads, columns=self.shards.column_runs(len(self.jacobian.params)))
        return TaskGradients(shared, gram=self.ranks.sum(gram(shared)), heads=heads)

    def task_gradients(self, losses: Losses, params: list[torch.Tensor]) -> torch.Tensor:
        """J of the global batch, this rank's columns of ``params`` (K × Σ local numel): ONE reduce-scatter."""
        unsharded = self.shards.unsharded
        # Batched: one vmapped backward per chunk of tasks, FSDP2 re-gathering each unit once per chunk;
        # loop: K backwards, FSDP2 re-gathering a unit for each task's backward that reaches it.
        flat = torch.empty(
            len(losses), sum(p.numel() for p in unsharded), dtype=unsharded[0].dtype, device=unsharded[0].device
        )
        self.jacobian.gradients(losses, unsharded, False, flat)
        sizes = [p.numel() for p in unsharded]
        grads = [block.to(param.dtype) for block, param in zip(flat.split(sizes, dim=1), params, strict=True)]
        return self.shards.reduce_scatter(grads).div_(self.shards.world)


# --------------------------------------------------------------------------- gradient writers


def head_gradients(task_params: list[torch.Tensor], rows: torch.Tensor, head_weights: torch.Tensor | None) -> None:
    """Makes ``Σ_k w_k t_k`` (``t_k``: row k of ``rows``) the task parameters' ``.grad`` (``w = 1`` without weights)."""
    weights = torch.ones(len(rows), dtype=rows.dtype, device=rows.device) if head_weights is None else head_weights
    flat = weights.to(rows.dtype) @ rows
    for param, grad in zip(task_params, flat.split([p.numel() for p in task_params]), strict=True):
        param.grad = grad.view_as(param).to(param.dtype)


@dataclass
class FlatGradWriter:
    """The direction is already in the flat buffer (``out=``): its slices become the shared ``.grad``; the heads get
    their rows' weighted sum where they travelled with J, else a backward of ``Σ_k h_k L_k`` through the heads."""

    jacobian: TaskJacobian
    task_params: list[torch.Tensor]
    timer: PhaseTimer

    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None:
        self.jacobian.assign_grads()
        if gradients.heads is not None:
            head_gradients(self.task_params, gradients.heads, direction.head_weights)
            return
        with self.timer.phase("backward"):
            backward_task_params(losses, direction.head_weights, self.task_params, retain_graph=False)


@dataclass
class WeightedBackwardWriter:
    """One ordinary backward of ``Σ_k w_k L_k`` with the direction's weights (the Gramian's step).

    Where the heads' weights differ from the direction's (PCGrad, CAGrad, Aligned-MTL: ones;
    Nash-MTL: α unclipped), the heads get theirs first from a backward through the heads only.
    Every parameter no loss reaches gets zeros, as in the modes that form J.
    """

    shared_params: list[torch.Tensor]
    task_params: list[torch.Tensor]
    timer: PhaseTimer

    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None:
        weights = direction.weights
        heads_apart = bool(self.task_params) and direction.head_weights is not weights
        with self.timer.phase("backward"):
            if heads_apart:
                backward_task_params(losses, direction.head_weights, self.task_params, retain_graph=True)
            inputs = self.shared_params if heads_apart else [*self.shared_params, *self.task_params]
            weighted_total(losses, weights).backward(inputs=inputs)
            for param in inputs:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)


@dataclass
class PullBackWriter:
    """Representation space in one process: the heads' backward, then ONE backward through the encoder with the
    feature direction as the features' gradient, into the flat buffer of the shared ``.grad``."""

    jacobian: TaskJacobian
    task_params: list[torch.Tensor]
    timer: PhaseTimer

    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None:
        with self.timer.phase("backward"):
            backward_task_params(losses, direction.head_weights, self.task_params, retain_graph=True)
            self.jacobian.pull_back(features, cast(torch.Tensor, direction.vector))
            self.jacobian.assign_grads()


@dataclass
class FeatureHookWriter:
    """Representation space across ranks: ONE ordinary backward of ``Σ_k h_k L_k`` whose gradient at the features is
    replaced by the direction (a tensor hook). The heads get ``h_k ∇L_k``, the encoder the direction pulled back, and
    DDP's reducer or FSDP2's reduce-scatter averages both across the ranks as for GD: the direction on this rank's
    samples is ``wᵀJ_r / W``, the cotangent ``wᵀJ_r`` which the reducer averages."""

    timer: PhaseTimer

    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None:
        cotangent = cast(torch.Tensor, direction.vector)
        with self.timer.phase("backward"):
            handles, offset = [], 0
            for feature in features:
                part = cotangent[offset : offset + feature.numel()].view_as(feature).to(feature.dtype)
                handles.append(feature.register_hook(lambda _gradient, part=part: part))
                offset += feature.numel()
            try:
                weighted_total(losses, direction.head_weights).backward()
            finally:
                for handle in handles:
                    handle.remove()


@dataclass
class ShardWriter:
    """FSDP2: the direction and the heads' weighted rows into each parameter's sharded ``.grad`` (FSDP2 does not reduce
    it again)."""

    params: list[torch.Tensor]  # shared, then task parameters: the order of the source's columns

    def __call__(self, losses: Losses, features: Features, gradients: TaskGradients, direction: Direction) -> None:
        heads = cast(torch.Tensor, gradients.heads)
        vector = cast(torch.Tensor, direction.vector)
        weights = direction.head_weights
        flat = torch.cat([vector, heads.sum(0) if weights is None else weights.to(heads.dtype) @ heads])
        offset = 0
        for p in self.params:
            p.grad = torch.zeros_like(p)
            local = cast(Any, p.grad).to_local()
            local.copy_(flat[offset : offset + local.numel()].view_as(local))
            offset += local.numel()


__all__ = [
    "Direction",
    "FeatureHookWriter",
    "FeatureJacobian",
    "FlatGradWriter",
    "GradientWriter",
    "GramianSource",
    "JacobianSource",
    "PullBackWriter",
    "ShardWriter",
    "ShardedJacobian",
    "SharedAndHeadJacobian",
    "SharedJacobian",
    "TaskGradients",
    "WeightedBackwardWriter",
    "backward_task_params",
    "combine",
    "combine_scaled",
    "head_gradients",
    "weighted_total",
    "weighting_inputs",
]
