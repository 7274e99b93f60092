"""What a training step communicates under DDP and FSDP2, per method: collectives, bytes, step time.

Two gloo ranks on this machine train a shared ``Linear`` encoder (+ tanh) and K ``Linear``
heads, each method on its own copy of the model, steps of the methods interleaved (round
robin) so that a loaded machine slows them alike. Per rank and step it records every
collective issued through ``torch.distributed`` from Python (FSDP2's all-gathers and
reduce-scatters, the methods' all-reduces) and, under DDP, the reducer's bucket all-reduces
(its default communication hook, labelled): their number, kind and bytes. ``fsdp2-keep``
is FSDP2 with ``reshard_after_forward=False``. Step time is the
median over the timed steps (rank 0). ``--space representation`` runs the gradient methods
with ``space="representation"`` (the model returns its features; the rows of the former
FSDP2 path are left out).

    python benchmarks/bench_distributed_comm.py --out benchmarks/results/distributed_comm_cpu.md
    python benchmarks/bench_distributed_comm.py --space representation \
        --out benchmarks/results/distributed_comm_representation_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selgroup_fast import methods
from selgroup_fast.checks import positive_int_arg
from selgroup_fast.methods.step import ShardedJacobian

WORLD_SIZE = 2
#: (label, name, options): the methods measured; Nash-MTL also when it reuses its weights every other
#: step; MGDA under FSDP2 also with K backwards (``jacobian="loop"``) and with the path this replaced
#: (:class:`FSDP2Backwards`, label "mgda, before").
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("gd", "gd", {}),
    ("uw", "uw", {}),
    ("mgda", "mgda", {}),
    ("mgda, jacobian=loop", "mgda", {"jacobian": "loop"}),
    ("mgda, before", "mgda", {}),
    ("pcgrad", "pcgrad", {"seed": 0}),
    ("graddrop", "graddrop", {"seed": 0}),
    ("nash_mtl, reuse every 2nd", "nash_mtl", {"update_weights_every": 2}),
]
#: The torch.distributed functions counted (what FSDP2 and the methods call from Python).
COUNTED = ("all_reduce", "all_gather_single", "reduce_scatter_single", "broadcast")


class Model(torch.nn.Module):
    def __init__(self, in_features: int, hidden: int, num_tasks: int, head_out: int, with_features: bool) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(in_features, hidden)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, head_out) for _ in range(num_tasks))
        self.with_features = with_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        features = self.encoder(x).tanh()
        predictions = [head(features) for head in self.heads]
        return (predictions, features) if self.with_features else predictions


def squared_errors(output: Any, targets: torch.Tensor) -> Any:
    """The K mean squared errors (with the features, for ``space="representation"``, when the model returns them)."""
    predictions, features = output if isinstance(output, tuple) else (output, None)
    losses = [(o - t).pow(2).mean() for o, t in zip(predictions, targets, strict=True)]
    return losses if features is None else (losses, features)


@contextlib.contextmanager
def counting(calls: list[tuple[str, int]]) -> Iterator[None]:
    """Records (kind, bytes of the input) of every call of the :data:`COUNTED` functions."""
    originals = {name: getattr(dist, name) for name in COUNTED}

    def wrap(name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = kwargs["input"] if "input" in kwargs else args[1] if name.endswith("_single") else args[0]
            calls.append(("ddp " + name if _in_ddp_hook else name, tensor.numel() * tensor.element_size()))
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


#: Set while DDP's reducer all-reduces a bucket (its default hook calls ``dist.all_reduce``).
_in_ddp_hook = False


def labelling_ddp_hook(state: Any, bucket: Any) -> Any:
    """DDP's default all-reduce of a bucket, which :func:`counting` then records as ``ddp all_reduce``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    global _in_ddp_hook
    _in_ddp_hook = True
    try:
        return allreduce_hook(state, bucket)
    finally:
        _in_ddp_hook = False


# DDP checks the annotations' objects (this module's are strings: from __future__ import annotations).
labelling_ddp_hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


class FSDP2Backwards(ShardedJacobian):
    """The FSDP2 source before the one reduce-scatter (for comparison): K ordinary backwards, each reduce-scattered by FSDP2."""

    def task_gradients(self, losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
        rows = []
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=k < len(losses) - 1)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]  # DTensors
            rows.append(torch.cat([grad.to_local().reshape(-1) for grad in grads]))
            for p in params:
                p.grad = None
        return torch.stack(rows)


#: ``fsdp2-keep``: FSDP2 with ``reshard_after_forward=False`` (the backwards need no re-gather).
CONFIGS = ("ddp", "fsdp2", "fsdp2-keep")


def build(label: str, name: str, options: dict[str, Any], config: str, args: argparse.Namespace) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = Model(args.in_features, args.hidden, args.tasks, args.head_out, args.space == "representation")
    forward: torch.nn.Module = model
    if config.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for module in [*model.heads, model.encoder, model]:
            fully_shard(module, reshard_after_forward=config == "fsdp2")
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model)
        forward.register_comm_hook(None, labelling_ddp_hook)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if name in methods.available("gradient"):
        options = {**options, "space": args.space}
    method = methods.create(name, optimizer, args.tasks, shared_params=list(model.encoder.parameters()), **options)
    if label.endswith("before"):
        method._source.__class__ = FSDP2Backwards  # type: ignore[attr-defined]
    return method, forward


def serve(rank: int, rendezvous: str, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.in_features, generator=generator)
    y = torch.randn(args.tasks, args.batch, args.head_out, generator=generator)
    rows = []
    for config in CONFIGS:
        runs = {
            label: build(label, name, options, config, args)
            for label, name, options in METHODS
            if (config.startswith("fsdp2") or "," not in label or "reuse" in label)
            and not (args.space == "representation" and label.endswith("before"))
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        calls: dict[str, list[tuple[str, int]]] = {name: [] for name in runs}
        for step in range(args.warmup + args.steps):
            for name, (method, forward) in runs.items():  # round robin: the methods interleaved
                step_calls: list[tuple[str, int]] = []
                dist.barrier()
                start = time.perf_counter()
                with counting(step_calls):
                    method.step(lambda forward=forward: squared_errors(forward(x), y))
                elapsed = time.perf_counter() - start
                if step >= args.warmup:
                    times[name].append(elapsed)
                    calls[name].extend(step_calls)
        for name in runs:
            kinds: Counter[str] = Counter()
            volume: Counter[str] = Counter()
            for kind, size in calls[name]:
                kinds[kind] += 1
                volume[kind] += size
            per_step = {kind: (kinds[kind] / args.steps, volume[kind] / args.steps) for kind in sorted(kinds)}
            rows.append((config, name, per_step, statistics.median(times[name])))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def table(rows: list, args: argparse.Namespace) -> str:
    sizes = {"P_s": args.hidden * (args.in_features + 1), "P_h": args.tasks * args.head_out * (args.hidden + 1)}
    lines = [
        "# Communication per training step under DDP and FSDP2 (2 gloo ranks, CPU)",
        "",
        f"Date: {datetime.date.today()}. Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other "
        f"jobs (load average {os.getloadavg()[0]:.1f} at the end: compare the times within this table only); "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        f"Command: `python {' '.join(sys.argv)}`",
        f"Model: Linear({args.in_features}, {args.hidden}) + tanh, K = {args.tasks} heads "
        f"Linear({args.hidden}, {args.head_out}); P_s = {sizes['P_s']}, P_h = {sizes['P_h']} (float32); "
        f"batch {args.batch} per rank; {args.steps} timed steps after {args.warmup} (median, rank 0); "
        f'the gradient methods with space="{args.space}".',
        "Collectives per step per rank: count × kind (MB sent into them, the input's size). ",
        "`ddp all_reduce`: DDP's reducer (its buckets); the others are called from Python "
        "(FSDP2's all-gathers and reduce-scatters, the methods' own all-reduces).",
        "",
        "| config | method | collectives per step (count × kind: MB) | step time (ms) | time / gd's |",
        "|---|---|---|---|---|",
    ]
    gd_time = {config: time for config, name, _, time in rows if name == "gd"}
    for config, name, per_step, time_s in rows:
        collectives = ", ".join(f"{count:g} × {kind}: {size / 1e6:.2f}" for kind, (count, size) in per_step.items())
        lines.append(
            f"| {config} | {name} | {collectives or 'none'} | {time_s * 1e3:.1f} | {time_s / gd_time[config]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=positive_int_arg, default=256)
    parser.add_argument("--hidden", type=positive_int_arg, default=512)
    parser.add_argument("--tasks", type=positive_int_arg, default=4)
    parser.add_argument("--head-out", type=positive_int_arg, default=8)
    parser.add_argument("--batch", type=positive_int_arg, default=32)
    parser.add_argument("--steps", type=positive_int_arg, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--space", choices=["parameters", "representation"], default="parameters")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    if not dist.is_available() or not dist.is_gloo_available():
        print("error: needs torch.distributed with gloo", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "rows.pt")
        mp.spawn(serve, args=(os.path.join(folder, "rendezvous"), args, result), nprocs=WORLD_SIZE)
        text = table(torch.load(result), args)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
