"""Per-step time of gd, selective and pcgrad with an eager and a ``torch.compile``d model (CPU or CUDA).

The model: selgroup-bench's (``selgroup_fast.models.MultiTaskViT``, a timm
``vit_tiny_patch16_224`` with random weights rebuilt for small inputs, one 1×1-conv decoder
per task of the NYUD kinds). For each method, two copies of the same model and optimizer
(Adam) train on the same batch: one eager, one compiled as a user compiles it
(``torch.compile(model, mode=--mode)``, Inductor, with ``task_params=model.task_parameters()``),
compiled afresh for each method (``torch._dynamo.reset()``, as a new script would). Their
steps are interleaved one by one in alternating order (``bench_methods.median_ms``), so that
a load change on a shared machine hits both alike; each of ``--rounds`` rounds gives the median
ms/step of each and their ratio eager / compiled (> 1: compiled faster). The table reports the
median over the rounds and the rounds' lowest and highest ratio. The first compiled step
(the compilation) is reported apart. On CUDA every step ends with a synchronisation.

Rows: ``selective`` runs its default warm-up, so every step updates each task alone (K
forwards, K backwards, K optimizer steps); ``selective:encoder`` compiles the shared encoder
only. ``pcgrad`` runs the device's default ``jacobian=`` (``methods.jacobian.DEFAULTS``: on the
CPU ``"gramian"``, on CUDA ``"batched"``; the compiled model loops: a compiled backward cannot
run under vmap), ``pcgrad:loop`` ``jacobian="loop"``, and
``pcgrad:representation`` ``space="representation"``: the closure returns the encoder's
features, so the compiled run compiles ``model.features`` and ``model.decode`` apart.

Usage::

    python benchmarks/bench_compile.py                                  # writes benchmarks/results/compile_cpu.md
    python benchmarks/bench_compile.py --rounds 1 --steps 3 --output -  # a quick look, printed only
    # on a GPU (its run time is mostly compilation):
    python benchmarks/bench_compile.py --device cuda --methods gd selective pcgrad --rounds 2 --output compile_cuda.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_methods import median_ms

import selgroup_fast
from selgroup_fast.cli_common import cpu_model
from selgroup_fast.models import MultiTaskViT, SyntheticBatch, parse_tasks, synthetic_batch
from selgroup_fast.tasks import task_losses

METHODS = ("gd", "selective", "selective:encoder", "pcgrad", "pcgrad:loop", "pcgrad:representation")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def training_step(
    name: str, model: MultiTaskViT, batch: SyntheticBatch, compile_mode: str | None
) -> Callable[[], object]:
    """One training step of method ``name`` (a row of :data:`METHODS`) on ``model``; eager when ``compile_mode`` is None."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    name, _, variant = name.partition(":")
    options: dict = {"shared_params": model.shared_parameters(), "task_params": model.task_parameters()}
    if variant in ("loop", "representation"):
        options["jacobian" if variant == "loop" else "space"] = variant
    if name == "pcgrad":
        options["seed"] = 0
    method = selgroup_fast.methods.create(name, optimizer, len(model.tasks), **options)
    compiled = compile_mode is not None
    if variant == "representation":
        features, decode = model.features, model.decode
        if compiled:
            features, decode = torch.compile(features, mode=compile_mode), torch.compile(decode, mode=compile_mode)

        def closure() -> object:
            shared = features(batch.images)
            return task_losses(decode(shared), batch.targets, model.tasks), shared

    else:
        forward: Callable = model
        if compiled and variant == "encoder":
            model.encoder = torch.compile(model.encoder, mode=compile_mode)
        elif compiled:
            forward = torch.compile(model, mode=compile_mode)

        def closure() -> object:
            return task_losses(forward(batch.images), batch.targets, model.tasks)

    if batch.images.device.type == "cuda":
        return lambda: (method.step(closure), torch.cuda.synchronize())
    return lambda: method.step(closure)


def device_name(device: torch.device) -> str:
    """The machine line of the report."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {cpu_model()}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at the start (a shared machine is loaded: read the ratios)"
    )


def run(args: argparse.Namespace) -> str:
    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = parse_tasks(str(args.tasks))
    template = MultiTaskViT(tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size).to(device)
    batch = synthetic_batch(tasks, args.batch, args.img_size, device, torch.float32, seed=0)
    lines = [
        f"# torch.compile: per-step time on {device.type.upper()}, eager vs compiled model",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {device_name(device)}",
        (
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"selgroup_fast {selgroup_fast.__version__}"
        ),
        f"- command: `python {' '.join(sys.argv)}`",
        (
            f"- model: selgroup-bench's MultiTaskViT (timm vit_tiny_patch16_224, random weights) at "
            f"{args.img_size}×{args.img_size}, patch {args.patch_size}, batch {args.batch}, K = {args.tasks} tasks; "
            f"Adam; `torch.compile(model, mode={args.mode!r})` with `task_params=model.task_parameters()`"
        ),
        (
            f"- timing: per method, {args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed steps, eager "
            "and compiled interleaved one by one in alternating order; ratio = eager / compiled (> 1: compiled "
            "faster), the median over the rounds and [lowest, highest]; ms/step: the medians over the rounds"
        ),
        "",
        "| method | eager (ms/step) | compiled (ms/step) | ratio | ratio range | first compiled step (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    compile_mode = None if args.mode == "default" else args.mode
    for name in args.methods:
        torch._dynamo.reset()
        eager = training_step(name, copy.deepcopy(template), batch, None)
        compiled = training_step(name, copy.deepcopy(template), batch, compile_mode or "default")
        begin = time.perf_counter()
        compiled()  # compiles
        first = time.perf_counter() - begin
        rounds = [median_ms(eager, compiled, warmup=args.warmup, steps=args.steps) for _ in range(args.rounds)]
        eager_ms = statistics.median(ms[0] for ms in rounds)
        compiled_ms = statistics.median(ms[1] for ms in rounds)
        ratios = [ms[0] / ms[1] for ms in rounds]
        lines.append(
            f"| {name} | {eager_ms:.1f} | {compiled_ms:.1f} | {statistics.median(ratios):.2f} | "
            f"[{min(ratios):.2f}, {max(ratios):.2f}] | {first:.0f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode=")
    parser.add_argument("--tasks", type=int, default=4, help="number of tasks K")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per method")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "compile_cpu.md"), help="'-': print only"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: torch sees no CUDA device\n")
    for flag, least in (("tasks", 1), ("rounds", 1), ("steps", 1), ("warmup", 0), ("batch", 1), ("threads", 1)):
        if getattr(args, flag) < least:
            parser.exit(2, f"error: --{flag} must be at least {least}, got {getattr(args, flag)}\n")
    report = run(args)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
