"""Training runs for tests/test_scaling.py: one method, 3 steps, in one configuration.

The problem of issue 10: a shared ``Linear`` encoder, 3 ``Linear`` heads, Adam with weight
decay, 3 steps, each step on a new batch. A configuration is ``"eager"`` (one process on
the global batch: the reference), ``"compiled"`` (the same with ``torch.compile(model)``;
``"inductor"`` with Inductor's code generation),
``"ddp"`` or ``"fsdp2"`` (2 gloo ranks on 127.0.0.1, each on its half of the global batch;
FSDP2 shards each head and the encoder with ``fully_shard``, as the FSDP2 docs do), or
``"ddp_compiled"`` (``torch.compile`` of the DDP-wrapped model, as the DDP docs do). With
``space="representation"`` the encoder and each head are compiled separately instead (the
losses must back-propagate through the features).

:func:`run` returns the parameters and the method's state as plain tensors (full tensors
under FSDP2) or, if the run raised, ``{"error": "<type>: <message>"}``. :func:`serve` runs a
list of cases on one rank of a process group, one after another, so that a test file
starts its 2 processes once.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from conftest import init_gloo

from selgroup_fast import methods
from selgroup_fast.methods.gradient import GradientMethod
from selgroup_fast.methods.weighting import Aggregator

NUM_TASKS = 3
STEPS = 3
GLOBAL_BATCH = 16
WORLD_SIZE = 2
IN_FEATURES, HIDDEN = 6, 16
#: The compile backend of the tests: AOTAutograd (where both compile bugs of issue 10 live)
#: without Inductor's code generation, which takes ~40 s per graph on the 2-core CI machine.
COMPILE_BACKEND = "aot_eager"

#: Options that make each method's randomness reproducible (the same draws in every run).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "pcgrad": {"seed": 3},
    "graddrop": {"seed": 3},
    # Its default inner step (lr 10, 20 steps) amplifies A's float32 rounding (the ranks' reduction order, compiled
    # kernels) ~300×, past float32 tolerances after a few steps: a milder one keeps the comparison about the step.
    "sdmgrad": {"lr": 1.0},
}


#: The scaled and overflow variants' ``GradScaler`` scale: a power of two, so that a scaled step is the unscaled one.
SCALE = 2.0**10
#: The ``"overflow"`` variant adds ``OVERFLOW · mean(z_0)`` (z_0: the encoder's first output) to every loss at its
#: second step: the gradients of the encoder's row 0 and bias 0 (rank 0's shard under FSDP2) are finite, SCALE times
#: them overflow float32 (max 3.4e38); the losses stay finite.
OVERFLOW = 1e37
#: Not a registered method: a column-wise aggregator (FSDP2: each rank its own columns) whose direction drops the
#: non-finite entries of J, so that only the scaler's check of J sees an overflow (GradDrop and the trimmed mean write
#: NaN, which every rank's check of ``.grad`` then sees too).
FINITE_COLUMN_SUM = "finite_column_sum"


class FiniteColumnSum(Aggregator):
    """``d_p = Σ_k J_kp`` over the finite entries of column p (a CombinesColumns)."""

    name = FINITE_COLUMN_SUM

    def combine(
        self, jacobian: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        direction = torch.where(jacobian.isfinite(), jacobian, 0.0).sum(0)
        return (direction if out is None else out.copy_(direction)), None

    def combine_columns(self, jacobian: torch.Tensor, runs: Any) -> torch.Tensor:
        return self.combine(jacobian)[0]


class SharedEncoderModel(torch.nn.Module):
    """``Linear`` encoder + tanh, one ``Linear`` head per task; ``forward`` returns K ``[B]`` predictions.

    Each task's loss depends on its own head only (a ``cat`` of the heads' outputs would
    give every head a zero gradient from every task's loss). With ``with_features`` it
    returns ``(predictions, features)``: the shared representation for ``space="representation"``,
    as two tensors (its halves, which the heads read concatenated) so that the features' order
    in the global Jacobian is exercised too.
    """

    def __init__(self, with_features: bool = False) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(IN_FEATURES, HIDDEN)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, 1) for _ in range(NUM_TASKS))
        self.with_features = with_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        features = self.encoder(x).tanh()
        if not self.with_features:
            return [head(features).squeeze(1) for head in self.heads]
        halves = features.chunk(2, dim=1)
        return [head(torch.cat(halves, dim=1)).squeeze(1) for head in self.heads], halves


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of the run (the same in every process)."""
    generator = torch.Generator().manual_seed(1234)
    mixing = torch.randn(IN_FEATURES, NUM_TASKS, generator=generator)
    data = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator)
        y = (x @ mixing).sin() + 0.1 * torch.randn(GLOBAL_BATCH, NUM_TASKS, generator=generator)
        data.append((x, y))
    return data


#: How a case builds its method: as is (on the CPU that is ``jacobian="loop"`` across ranks: the
#: Gramian default does not apply there), with ``task_params=``, with ``jacobian="loop"``, with the
#: vectorised Jacobian in chunks of two tasks (``"chunked"``: one vmapped backward, then one plain one),
#: without a seed (each rank's global RNG seeded differently: the method must still draw rank
#: 0's numbers everywhere), reusing its weights every other step (Nash-MTL's
#: ``update_weights_every=2``), with ``process_group=`` a group of its own (a new group of
#: the same ranks: the method's collectives must go through it), or with
#: ``space="representation"`` (the model returns its features too), with a ``GradScaler`` (``"scaled"``: its
#: reference is the unscaled run), or with a scaler and an :data:`OVERFLOW` at the second step (``"overflow"``;
#: ``"overflow_raise"`` with ``nonfinite="raise"``, whose loss flags cross the ranks before the backward).
OVERFLOW_VARIANTS = ("overflow", "overflow_raise")
VARIANTS = (
    *("plain", "task_params", "loop", "chunked", "unseeded", "reuse", "process_group", "representation"),
    *("scaled", *OVERFLOW_VARIANTS),
)
#: The variants that change what is computed: their reference is the eager run of the same variant.
ALGORITHM_VARIANTS = ("reuse", "representation", *OVERFLOW_VARIANTS)


def make_method(
    name: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module, variant: str, rank: int, group: Any = None
) -> Any:
    """Method ``name`` over ``optimizer``, told the encoder's (and, for ``"task_params"``, each head's) parameters."""
    options: dict[str, Any] = {"shared_params": list(model.encoder.parameters())}
    if group is not None:
        options["process_group"] = group
    if variant == "reuse":
        options["update_weights_every"] = 2
    if variant == "task_params":
        options["task_params"] = [list(head.parameters()) for head in model.heads]
    if variant == "loop":
        options["jacobian"] = "loop"
    if variant == "chunked":
        options.update(jacobian="batched", chunk_size=2)
    if variant == "representation":
        options["space"] = "representation"
    if variant in ("scaled", *OVERFLOW_VARIANTS):
        options["grad_scaler"] = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    if variant == "overflow_raise":
        options["nonfinite"] = "raise"
    if variant == "unseeded":
        torch.manual_seed(100 + rank)
    else:
        options.update(METHOD_OPTIONS.get(name, {}))
    if name == "selective":
        options.update(warmup_steps=1, decay=0.5)
        if variant != "unseeded":
            options["generator"] = torch.Generator().manual_seed(5)
    if name == FINITE_COLUMN_SUM:
        return GradientMethod(optimizer, NUM_TASKS, FiniteColumnSum(NUM_TASKS), **options)
    return methods.create(name, optimizer, NUM_TASKS, **options)


def plain(value: Any) -> Any:
    """``value`` with every tensor detached, cloned and (for a DTensor) gathered in full."""
    if isinstance(value, torch.Tensor):
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        return full.detach().clone()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def run(
    name: str, config: str, variant: str = "plain", rank: int = 0, world_size: int = 1, reset: bool = True
) -> dict[str, Any]:
    """Trains method ``name`` for :data:`STEPS` steps in ``config``; returns parameters and method state.

    ``reset=False``: a compiled configuration keeps what earlier runs compiled (as a notebook or sweep would).
    """
    try:
        torch.manual_seed(0)  # the same initial parameters in every process
        model = SharedEncoderModel(with_features=variant in ("representation", *OVERFLOW_VARIANTS))
        if config == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for head in model.heads:
                fully_shard(head)
            fully_shard(model.encoder)
            fully_shard(model)
        forward: torch.nn.Module = model
        if config in ("ddp", "ddp_compiled"):
            forward = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=name == "selective")
        if config in ("compiled", "inductor", "ddp_compiled"):
            # Dynamo caches compiled code by code object, across model instances: each case
            # compiles afresh, as a new training script would, unless reset=False.
            if reset:
                torch._dynamo.reset()
            backend = "inductor" if config == "inductor" else COMPILE_BACKEND
            if variant == "representation":  # the features must stay an edge between compiled regions
                for module in (model.encoder, *model.heads):
                    module.compile(backend=backend)
            else:
                forward = torch.compile(forward, backend=backend)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
        group = dist.new_group(list(range(world_size))) if variant == "process_group" else None
        method = make_method(name, optimizer, model, variant, rank, group)
        collectives: list[list[tuple[str, int]]] = []  # per step: (kind, numel) of each collective from Python
        groups: list[Any] = []  # the group= of each all_reduce
        data = batches()
        for step, (x, y) in enumerate(data):
            rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
            collectives.append([])
            with counting_collectives(collectives[-1], groups):
                if variant in OVERFLOW_VARIANTS:
                    factor = OVERFLOW if step == 1 else 0.0
                    closure = lambda x=x[rows], y=y[rows], factor=factor: overflowing(forward(x), y, factor)  # noqa: E731
                else:
                    closure = lambda x=x[rows], y=y[rows]: squared_errors(forward(x), y)  # noqa: E731
                if getattr(method, "reads_two_batches", False):
                    # MoDo, SDMGrad: the second batch is the next one, each rank its rows of it, as the first
                    # (the same shapes: a compiled model's code is reused, as for the other methods).
                    second_x, second_y = data[(step + 1) % len(data)]
                    method.step(closure, lambda x=second_x[rows], y=second_y[rows]: squared_errors(forward(x), y))
                else:
                    method.step(closure)
        return {
            "params": {key: plain(value) for key, value in model.named_parameters()},
            "state": plain(method.state_dict()),
            "optimizer": plain(optimizer.state_dict()["state"]),
            "collectives": collectives,
            "through_the_group": [g is group for g in groups],
            "skipped_steps": int(method.skipped_steps),
            "scale": method.grad_scaler.get_scale() if method.grad_scaler is not None else None,
        }
    except Exception as error:  # noqa: BLE001 - reported to the test, which names the configuration
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def squared_errors(output: Any, y: torch.Tensor) -> Any:
    """The K mean squared errors of the model's output (with its features when it returns them)."""
    predictions, features = output if isinstance(output, tuple) else (output, None)
    losses = [(out - y[:, k]).pow(2).mean() for k, out in enumerate(predictions)]
    return losses if features is None else (losses, features)


def overflowing(output: Any, y: torch.Tensor, factor: float) -> list[torch.Tensor]:
    """The K squared errors plus ``factor`` times the mean of the encoder's first output (:data:`OVERFLOW_VARIANTS`)."""
    predictions, features = output
    return [loss + factor * features[0][:, 0].mean() for loss in squared_errors(predictions, y)]


@contextlib.contextmanager
def counting_collectives(calls: list[tuple[str, int]], groups: list[Any]) -> Iterator[None]:
    """Records (kind, input numel) of every all-reduce and reduce-scatter called from Python, and each all-reduce's group.

    DDP's reducer all-reduces from C++ (not recorded); FSDP2's reduce-scatters and the methods'
    collectives go through ``torch.distributed``'s Python functions.
    """
    all_reduce, reduce_scatter = dist.all_reduce, dist.reduce_scatter_single

    def counted_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(("all_reduce", tensor.numel()))
        groups.append(kwargs.get("group"))
        return all_reduce(tensor, *args, **kwargs)

    def counted_reduce_scatter(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(("reduce_scatter", input.numel()))
        return reduce_scatter(output, input, *args, **kwargs)

    dist.all_reduce, dist.reduce_scatter_single = counted_all_reduce, counted_reduce_scatter
    try:
        yield
    finally:
        dist.all_reduce, dist.reduce_scatter_single = all_reduce, reduce_scatter


def serve(rank: int, port: int, cases: list[tuple[str, str, str]], out_dir: str) -> None:
    """Runs ``cases`` (method, config, variant) on rank ``rank``; saves the results to ``out_dir``."""
    init_gloo(rank, port, WORLD_SIZE)
    results = {}
    try:
        for case in cases:
            name, config, variant = case
            results[case] = run(name, config, variant, rank, WORLD_SIZE)
            dist.barrier()  # a failed case on both ranks leaves no collective pending for the next
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
