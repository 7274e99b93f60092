"""Per-step time of gd, selective and pcgrad with an eager and a ``torch.compile``d model, on the CPU.

The model: selgroup-bench's (``selgroup_fast.bench.MultiTaskViT``, a timm
``vit_tiny_patch16_224`` with random weights rebuilt for small inputs, one 1×1-conv decoder
per task of the NYUD kinds). For each method, two copies of the same model and optimizer
(Adam) train on the same batch: one eager, one ``torch.compile(model)`` (Inductor, the
default backend), compiled afresh for each method (``torch._dynamo.reset()``, as a new
script would). Their steps are interleaved one by one in alternating order
(``bench_methods.median_ms``), so that a load change on a shared machine hits both alike;
the table reports the median ms/step and eager / compiled (> 1: compiled faster). The
warm-up steps include the compilation, which is reported apart.

``selective`` runs with ``task_params=`` (required with a compiled model) and its default
warm-up, so every step updates each task alone: K forwards, K backwards, K optimizer steps.
With the whole model compiled, every group's backward runs the compiled backward of all K
decoders (zero gradients for the tasks outside the group); ``selective:encoder`` compiles
the shared encoder only.

Usage::

    python benchmarks/bench_compile.py                       # writes benchmarks/results/compile_cpu.md
    python benchmarks/bench_compile.py --steps 3 --output -  # a quick look, printed only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_methods import median_ms

import selgroup_fast
from selgroup_fast.bench import (
    MultiTaskViT,
    SyntheticBatch,
    parse_tasks,
    synthetic_batch,
    task_losses,
)
from selgroup_fast.bench.report import cpu_model

#: The rows: a method name; ``name:loop``, a gradient method with ``jacobian="loop"`` (what the
#: compiled model runs: a compiled backward cannot run under vmap, so the batched mode loops);
#: ``name:encoder``, only the shared encoder compiled (the decoders stay eager).
METHODS = ("gd", "selective", "selective:encoder", "pcgrad", "pcgrad:loop")


def training_step(name: str, model: MultiTaskViT, forward: Callable, batch: SyntheticBatch) -> Callable[[], object]:
    """One training step of method ``name`` on ``model``, its forward run through ``forward``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    options: dict = {"shared_params": model.shared_parameters()}
    name, _, variant = name.partition(":")
    if variant == "loop":
        options["jacobian"] = "loop"
    if name == "selective":
        options["task_params"] = [list(decoder.parameters()) for decoder in model.decoders]
    if name == "pcgrad":
        options["seed"] = 0
    method = selgroup_fast.methods.create(name, optimizer, len(model.tasks), **options)
    return lambda: method.step(lambda: task_losses(forward(batch.images), batch.targets, model.tasks))


def run(args: argparse.Namespace) -> str:
    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tasks = parse_tasks(str(args.tasks))
    template = MultiTaskViT(tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size)
    batch = synthetic_batch(tasks, args.batch, args.img_size, "cpu", torch.float32, seed=0)
    lines = [
        "# torch.compile: per-step time on the CPU, eager vs compiled model",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        (
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
            "the machine was LOADED (other jobs running): the eager and compiled steps run interleaved, so read the "
            "ratios, absolute times move with the load"
        ),
        (
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"selgroup_fast {selgroup_fast.__version__}"
        ),
        f"- command: `python {' '.join(sys.argv)}`",
        (
            f"- model: selgroup-bench's MultiTaskViT (timm vit_tiny_patch16_224, random weights) at "
            f"{args.img_size}×{args.img_size}, patch {args.patch_size}, batch {args.batch}, K = {args.tasks} tasks; Adam"
        ),
        (
            f"- timing: {args.warmup} warm-up steps (compilation included), then the median of {args.steps} steps, "
            "eager and compiled interleaved one by one in alternating order; ratio = eager / compiled (> 1: compiled faster)"
        ),
        "",
        "| method | eager (ms/step) | compiled (ms/step) | ratio | first compiled step (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.methods:
        torch._dynamo.reset()
        eager_model, compiled_model = copy.deepcopy(template), copy.deepcopy(template)
        eager = training_step(name, eager_model, eager_model, batch)
        if name.endswith(":encoder"):
            compiled_model.encoder = torch.compile(compiled_model.encoder)
            compiled = training_step(name, compiled_model, compiled_model, batch)
        else:
            compiled = training_step(name, compiled_model, torch.compile(compiled_model), batch)
        begin = time.perf_counter()
        compiled()  # compiles
        first = time.perf_counter() - begin
        eager_ms, compiled_ms = median_ms(eager, compiled, warmup=args.warmup, steps=args.steps)
        lines.append(f"| {name} | {eager_ms:.1f} | {compiled_ms:.1f} | {eager_ms / compiled_ms:.2f} | {first:.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", type=int, default=4, help="number of tasks K")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "compile_cpu.md"), help="'-': print only"
    )
    args = parser.parse_args(argv)
    report = run(args)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
