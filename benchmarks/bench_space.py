"""Per-step time of the gradient methods in parameter space and in representation space, next to GD.

``space="representation"`` (Sener & Koltun, NeurIPS 2018, §3.3) takes the task gradients
with respect to the shared features z instead of the shared parameters: one batched
backward through the heads, the method's fused op on the K×Z gradients, then ONE
backward through the encoder. This script times, on selgroup-bench's model
(``selgroup_fast.models.MultiTaskViT``, taskonomy's K = 11 tasks by default, small CPU
size: ``vit_tiny_patch16_224`` at 32×32 with 8×8 patches, random weights), one training
step of GD, then of each method in both spaces, all interleaved step by step in
alternating order (``bench_methods.median_ms``) so that a load change hits all alike;
the table gives the median ms/step and the ratio to GD's step.

Usage::

    python benchmarks/bench_space.py                          # writes benchmarks/results/space_cpu.md
    python benchmarks/bench_space.py --methods pcgrad mgda --steps 5 --output -
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from bench_methods import median_ms

import selgroup_fast
from selgroup_fast.cli_common import cpu_model
from selgroup_fast.models import MultiTaskViT, SyntheticBatch, parse_tasks, synthetic_batch
from selgroup_fast.tasks import task_losses

GRADIENT_METHODS = selgroup_fast.methods.available("gradient")


def train_step(
    name: str, model: MultiTaskViT, batch: SyntheticBatch, lr: float, **options: object
) -> Callable[[], object]:
    """One training step of method ``name``; its closure returns ``(losses, features)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    shared = model.shared_parameters() if selgroup_fast.methods.kind(name) == "gradient" else None
    method = selgroup_fast.methods.create(name, optimizer, len(model.tasks), shared_params=shared, **options)

    def closure() -> tuple[list[torch.Tensor], torch.Tensor]:
        features = model.features(batch.images)
        return task_losses(model.decode(features), batch.targets, model.tasks), features

    return lambda: method.step(closure)


def run(args: argparse.Namespace) -> str:
    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tasks = parse_tasks(args.tasks)
    template = MultiTaskViT(tasks, "vit_tiny_patch16_224", args.img_size, args.patch_size)
    batch = synthetic_batch(tasks, args.batch, args.img_size, "cpu", torch.float32, seed=0)
    seeded = {"pcgrad": {"seed": 0}, "graddrop": {"seed": 0}}
    labels = ["gd"]
    steps: list[Callable[[], object] | None] = [train_step("gd", copy.deepcopy(template), batch, args.lr)]
    for name in args.methods:
        for space in ("parameters", "representation"):
            labels.append(f"{name} ({space})")
            steps.append(
                train_step(
                    name,
                    copy.deepcopy(template),
                    batch,
                    args.lr,
                    space=space,
                    jacobian=args.jacobian,
                    **seeded.get(name, {}),
                )
            )
    times = median_ms(*steps, warmup=args.warmup, steps=args.steps)
    gd = times[0]
    lines = [
        "# Gradient methods in parameter and representation space: per-step time on the CPU, next to GD",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); "
        f"{args.load_note}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"selgroup_fast {selgroup_fast.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: selgroup-bench's MultiTaskViT, timm vit_tiny_patch16_224 (random weights) at "
        f"{args.img_size}×{args.img_size}, patch {args.patch_size}, batch {args.batch}, tasks `{args.tasks}` "
        f'(K = {len(tasks)}); SGD lr {args.lr}; `jacobian="{args.jacobian}"`',
        f"- timing: {args.warmup} warm-up steps, then the median of {args.steps} steps (ms/step), every configuration's "
        "steps interleaved one by one in alternating order; ratio = time / GD's time",
        "",
        "| method | ms/step | × GD |",
        "|---|---:|---:|",
    ]
    for label, time_ms in zip(labels, times, strict=False):
        assert time_ms is not None and gd is not None
        lines.append(f"| {label} | {time_ms:.1f} | {time_ms / gd:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="taskonomy", help="a preset of selgroup-bench or a number K")
    parser.add_argument("--methods", nargs="+", default=["pcgrad"], choices=GRADIENT_METHODS)
    parser.add_argument("--jacobian", default="batched", choices=["batched", "loop"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--load-note",
        default="the machine was shared with other jobs (loaded): read the ratios",
        help="what the result file says about the machine's load",
    )
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "space_cpu.md"), help="'-': print only"
    )
    args = parser.parse_args(argv)
    report = run(args)
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
