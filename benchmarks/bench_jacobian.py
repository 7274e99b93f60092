"""Time and peak memory of the parameter-space task Jacobian, by ``jacobian=`` mode and ``chunk_size``.

On selgroup-bench's model (``MultiTaskViT``: ``vit_tiny_patch16_224`` at 32×32 with 8×8
patches, random weights; K generic tasks), each configuration times
``TaskJacobian.compute`` (forward + per-task gradients of the shared parameters) in its
own child process, so that its peak resident memory (``ru_maxrss``) is its own; the
table reports the median ms per Jacobian and the peak RSS above the child's RSS before the
first forward. The children of one K run in rounds (every configuration once per round, in
alternating order) so that a load change hits all alike; the median over rounds is kept.

Usage::

    python benchmarks/bench_jacobian.py                       # K = 4 and 11, writes benchmarks/results/jacobian_cpu.md
    python benchmarks/bench_jacobian.py --tasks 4 --rounds 1 --output -
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import selgroup_fast
from selgroup_fast.bench.report import cpu_model


def configurations(num_tasks: int, torchjd: bool) -> list[tuple[str, Optional[int]]]:
    """(mode, chunk_size) pairs: the loop, the whole batch, chunks of 1, 2 and 4 tasks below K, and TorchJD's engines."""
    chunks = [c for c in (1, 2, 4) if c < num_tasks]
    theirs = [("torchjd-autojac", None), ("torchjd-autogram", None)] if torchjd else []
    return [("loop", None), ("batched", None), *[("batched", c) for c in chunks], *theirs]


def jacobian_function(mode: str, chunk_size: Optional[int], model, num_tasks: int):
    """A function of the K losses computing what ``mode`` computes (ours: J; TorchJD's autojac: J; autogram: G)."""
    from selgroup_fast.methods.jacobian import TaskJacobian

    shared = model.shared_parameters()
    if mode == "torchjd-autojac":
        from torchjd.autojac import jac

        return lambda losses: jac(torch.stack(losses), shared, parallel_chunk_size=chunk_size)
    if mode == "torchjd-autogram":
        from torchjd.autogram import Engine

        # The engine covers the direct parameters of the modules given: every encoder module that owns some.
        owners = [m for m in model.encoder.modules() if any(True for _ in m.parameters(recurse=False))]
        engine = Engine(*owners, batch_dim=None)
        return lambda losses: engine.compute_gramian(torch.stack(losses))
    jacobian = TaskJacobian(shared, num_tasks, mode=mode, chunk_size=chunk_size)
    return jacobian.compute


def child(args: argparse.Namespace) -> None:
    """Times one configuration and prints a JSON line: median ms and peak RSS growth in MiB."""
    from selgroup_fast.bench import MultiTaskViT, parse_tasks, synthetic_batch, task_losses

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tasks = parse_tasks(str(args.child_tasks))
    model = MultiTaskViT(tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size)
    batch = synthetic_batch(tasks, args.batch, args.img_size, "cpu", torch.float32, seed=0)
    compute = jacobian_function(args.mode, args.chunk_size, model, len(tasks))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        begin = time.perf_counter()
        compute(task_losses(model(batch.images), batch.targets, model.tasks))
        if step >= args.warmup:
            times.append(1000.0 * (time.perf_counter() - begin))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"ms": statistics.median(times), "peak_mib": (peak - before) / 1024}))


def run(args: argparse.Namespace) -> str:
    import timm

    lines = [
        "# Parameter-space task Jacobian on the CPU: time and peak memory by mode and chunk size",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} torch thread(s); {args.load_note}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"selgroup_fast {selgroup_fast.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: selgroup-bench's MultiTaskViT, vit_tiny_patch16_224 (random weights) at {args.img_size}×{args.img_size}, "
        f"patch {args.patch_size}, batch {args.batch}; K generic tasks",
        f"- timing: one child process per configuration and round ({args.rounds} rounds, alternating order); in each, "
        f"{args.warmup} warm-up and {args.steps} timed Jacobians (forward included), median ms; peak = growth of ru_maxrss "
        "from before the first forward (forward activations, the K×P buffer and the backward's temporaries)",
        "",
    ]
    for num_tasks in args.tasks:
        configs = configurations(num_tasks, args.torchjd)
        results: dict[tuple[str, Optional[int]], list[dict]] = {config: [] for config in configs}
        for round_index in range(args.rounds):
            for mode, chunk in configs if round_index % 2 == 0 else configs[::-1]:
                command = [sys.executable, __file__, "--child-tasks", str(num_tasks), "--mode", mode,
                           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--batch", str(args.batch), "--img-size", str(args.img_size), "--patch-size", str(args.patch_size)]
                if chunk is not None:
                    command += ["--chunk-size", str(chunk)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results[(mode, chunk)].append(json.loads(output.strip().splitlines()[-1]))
        base = statistics.median(r["ms"] for r in results[("batched", None)])
        lines += [f"## K = {num_tasks}", "", "| jacobian | chunk_size | ms / Jacobian | × batched | peak MiB |",
                  "|---|---:|---:|---:|---:|"]
        for mode, chunk in configs:
            ms = statistics.median(r["ms"] for r in results[(mode, chunk)])
            peak = statistics.median(r["peak_mib"] for r in results[(mode, chunk)])
            lines.append(f"| {mode} | {chunk if chunk is not None else '—'} | {ms:.1f} | {ms / base:.2f} | {peak:.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 11], help="numbers of tasks K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torchjd", action="store_true", help="also TorchJD's autojac (J) and autogram (G only) engines")
    parser.add_argument("--load-note", default="the machine was shared with other jobs (loaded): read the ratios")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "jacobian_cpu.md"), help="'-': print only")
    parser.add_argument("--child-tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="batched", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_tasks is not None:
        child(args)
        return
    report = run(args)
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
