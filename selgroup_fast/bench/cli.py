"""``selgroup-bench``: the per-batch timing breakdown of every method (the package's main job)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import methods
from .model import PRESETS, TaskSpec, parse_tasks
from .plots import plot_breakdown, plot_sweep
from .report import print_table, write_reports
from .timing import BenchConfig, default_methods, run_suite


@dataclass(frozen=True)
class MachineDefaults:
    """What a run uses when the size and length options are not given."""

    tasks: str
    img_size: int
    patch_size: int
    warmup: int
    steps: int
    why: str


#: GPU: the paper's 224 px images with 16 px patches and its Taskonomy task count
#: (Table E.1 is measured with the 11 Taskonomy tasks).
GPU_DEFAULTS = MachineDefaults(
    tasks="taskonomy", img_size=224, patch_size=16, warmup=5, steps=20, why="GPU defaults: the paper's 224 px, patch 16"
)
#: CPU: small images, the 4 NYUD tasks and few steps, so that the default run (every
#: method) finishes in under 3 minutes on 2 cores.
CPU_DEFAULTS = MachineDefaults(
    tasks="nyud",
    img_size=64,
    patch_size=8,
    warmup=2,
    steps=8,
    why="CPU defaults: small 64 px images (patch 8) and few steps so that the default run takes "
    "under 3 minutes on 2 cores; pass --img-size 224 --patch-size 16 for the paper's size",
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def _task_set(text: str) -> list[TaskSpec]:
    try:
        return parse_tasks(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model, the data and the timing (shared with benchmarks/reference_loop.py)."""
    parser.add_argument(
        "--tasks",
        type=_task_set,
        help=f"a number of tasks K or a preset ({', '.join(f'{n} = {len(p)}' for n, p in PRESETS.items())}); "
        f"default: {CPU_DEFAULTS.tasks} on a CPU, {GPU_DEFAULTS.tasks} on a GPU",
    )
    parser.add_argument("--backbone", default="vit_tiny_patch16_224", help="a timm ViT name (random init)")
    parser.add_argument(
        "--img-size",
        type=_positive_int,
        help=f"image side in pixels (default: {CPU_DEFAULTS.img_size} on a CPU, {GPU_DEFAULTS.img_size} on a GPU)",
    )
    parser.add_argument(
        "--patch-size",
        type=_positive_int,
        help=f"ViT patch side (default: {CPU_DEFAULTS.patch_size} on a CPU, {GPU_DEFAULTS.patch_size} on a GPU)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument(
        "--steps",
        type=_positive_int,
        help=f"measured steps per method (default: {CPU_DEFAULTS.steps} on a CPU, {GPU_DEFAULTS.steps} on a GPU)",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int,
        help=f"discarded steps per method (default: {CPU_DEFAULTS.warmup} on a CPU, {GPU_DEFAULTS.warmup} on a GPU)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class RunSettings:
    """The parsed run options with the machine's defaults filled in."""

    config: BenchConfig
    tasks: list[TaskSpec]
    defaults_note: str | None  # why the sizes are what they are, when the machine's defaults were used


def run_settings(args: argparse.Namespace) -> RunSettings:
    """Resolves the options of :func:`add_run_arguments` against the machine's defaults."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    used_defaults = args.img_size is None and args.patch_size is None and args.steps is None
    config = BenchConfig(
        backbone=args.backbone,
        img_size=args.img_size or defaults.img_size,
        patch_size=args.patch_size or defaults.patch_size,
        batch_size=args.batch_size,
        steps=args.steps or defaults.steps,
        warmup=args.warmup or defaults.warmup,
        device=device,
        dtype=getattr(torch, args.dtype),
        seed=args.seed,
    )
    tasks = args.tasks if args.tasks is not None else parse_tasks(defaults.tasks)
    return RunSettings(config, tasks, defaults.why if used_defaults else None)


def describe(settings: RunSettings) -> str:
    """One line saying what will run, plus why when the machine's defaults chose the sizes."""
    config = settings.config
    line = (
        f"K = {len(settings.tasks)}, {config.backbone} at {config.img_size} px / patch {config.patch_size}, "
        f"batch {config.batch_size}, {str(config.dtype).removeprefix('torch.')} on {config.device}, "
        f"{config.warmup} warm-up + {config.steps} measured steps per method"
    )
    return line + (f"\n({settings.defaults_note})" if settings.defaults_note else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selgroup-bench",
        description="Per-batch timing breakdown (the phases of Jeong & Yoon, ICLR 2025, Table E.1) of every "
        "multi-task method on a ViT encoder with one single-conv decoder per task.",
    )
    parser.add_argument("--methods", help="comma-separated method names (default: every available method)")
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: bench_out)")
    parser.add_argument(
        "--sweep-tasks", type=_int_list, help="also time every method at each of these K (e.g. 2,4,8,16,32)"
    )
    return parser


def _notes(method_names: list[str], config: BenchConfig, defaults_why: str | None) -> list[str]:
    notes = [
        "total: median wall clock around the whole step() (with torch.cuda.synchronize before and after on a GPU); "
        "phases: medians of the methods' own profiling (CUDA events on a GPU, wall clock on a CPU); "
        "share: a phase's median over the median total; other: total minus the phases (loop overhead, zero_grad)",
    ]
    if "selective" in method_names:
        notes.append(
            f"selective: built with warmup_steps={config.warmup} (the bench's warm-up steps), so the measured steps "
            "run past its warm-up with the regrouped updates; groups: its average number of groups per measured step"
        )
    if config.device.type == "cuda":
        notes.append("peak MiB: torch.cuda.max_memory_allocated over the method's run (model, optimizer, activations)")
    else:
        notes.append(
            "peak MiB: growth of the process's resident set size over the method's run, sampled every 2 ms "
            "(a lower bound: memory freed by earlier methods and reused does not show)"
        )
    if defaults_why:
        notes.append(defaults_why)
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench; ``argv`` defaults to the command line. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = run_settings(args)
    config, tasks = settings.config, settings.tasks
    method_names = [name.strip() for name in args.methods.split(",")] if args.methods else default_methods()
    available = methods.available()
    for name in method_names:
        if name not in available:
            raise ValueError(f"unknown or unavailable method {name!r}; available: {', '.join(available)}")
    task_sets = {len(tasks): tasks}
    for k in args.sweep_tasks or []:
        task_sets.setdefault(k, parse_tasks(str(k)))
    sweep = f" (and the sweep K = {', '.join(map(str, args.sweep_tasks))})" if args.sweep_tasks else ""
    print(f"selgroup-bench: {', '.join(method_names)}; {describe(settings)}{sweep}", file=sys.stderr)

    from tqdm import tqdm

    total_steps = len(task_sets) * len(method_names) * (config.warmup + config.steps)
    with tqdm(total=total_steps, file=sys.stderr, unit="step", dynamic_ncols=True) as progress:
        suite = run_suite(method_names, [task_sets[k] for k in sorted(task_sets)], config, progress)

    notes = _notes(method_names, config, settings.defaults_note)
    print_table(suite, len(tasks), notes)
    args.out.mkdir(parents=True, exist_ok=True)
    what = f"{config.backbone}, {config.img_size} px, batch {config.batch_size}, {config.device}"
    images = [plot_breakdown(suite.results[len(tasks)], args.out / "breakdown.png", f"K = {len(tasks)}: {what}").name]
    if args.sweep_tasks:
        images.append(plot_sweep(suite, args.out / "sweep.png", f"time per batch against K: {what}").name)
    command = shlex.join(["selgroup-bench", *argv])
    paths = write_reports(args.out, suite, command, len(tasks), notes, images)
    print(f"\nwrote {', '.join(str(p) for p in [*paths.values(), *(args.out / i for i in images)])}", file=sys.stderr)
    return 0
