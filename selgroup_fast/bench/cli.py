"""``selgroup-bench``: the per-batch timing breakdown of every method (the package's main job)."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import methods
from ..checks import positive_int_arg
from ..cli_common import MachineDefaults, UsageError, resolve_device
from ..models import ModelError, ModelFactory, load_factory, parse_tasks, vit_bench_model
from ..tasks import PRESETS
from .report import write_outputs
from .timing import AMP_DTYPES, SPACES, BenchConfig, default_methods, run_suite


@dataclass(frozen=True)
class BenchDefaults(MachineDefaults):
    """The bench's defaults on one kind of machine: the model's size, the tasks and the timing's length."""

    tasks: str
    warmup: int
    rounds: int
    steps: int


#: GPU: the paper's 224 px images with 16 px patches and its Taskonomy task count
#: (Table E.1 is measured with the 11 Taskonomy tasks).
GPU_DEFAULTS = BenchDefaults(
    backbone="vit_tiny_patch16_224",
    tasks="taskonomy",
    img_size=224,
    patch_size=16,
    warmup=5,
    rounds=10,
    steps=2,
    note="GPU defaults: the paper's 224 px, patch 16",
)
#: CPU: small images, the 4 NYUD tasks and few steps, so that the default run (every
#: method) finishes in about 3 minutes on 2 idle cores (161 s, 34 methods, 2026-12-07).
CPU_DEFAULTS = BenchDefaults(
    backbone="vit_tiny_patch16_224",
    tasks="nyud",
    img_size=64,
    patch_size=8,
    warmup=2,
    rounds=8,
    steps=1,
    note="CPU defaults: small 64 px images (patch 8) and few steps so that the default run takes "
    "about 3 minutes on 2 idle cores; pass --img-size 224 --patch-size 16 for the paper's size",
)

BUILT_IN_MODEL = "selgroup_fast.models.vit:vit_bench_model"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model, the data and the timing (shared with benchmarks/reference_loop.py)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="time your own model: a factory taking a selgroup_fast.models.ModelRequest and returning a "
        "selgroup_fast.models.BenchModel (the current directory is searched first); default: the built-in ViT "
        f"({BUILT_IN_MODEL})",
    )
    model.add_argument(
        "--tasks",
        help=f"a number of tasks K or, for the built-in model, a preset "
        f"({', '.join(f'{n} = {len(p)}' for n, p in PRESETS.items())}); passed to --model's factory as "
        f"ModelRequest.tasks; default: {CPU_DEFAULTS.tasks} on a CPU, {GPU_DEFAULTS.tasks} on a GPU for the built-in "
        "model, the factory's own otherwise",
    )
    model.add_argument(
        "--backbone", help=f"built-in model: a timm ViT name, random init (default: {CPU_DEFAULTS.backbone})"
    )
    model.add_argument(
        "--img-size",
        type=positive_int_arg,
        help=f"built-in model: image side in pixels (default: {CPU_DEFAULTS.img_size} on a CPU, "
        f"{GPU_DEFAULTS.img_size} on a GPU)",
    )
    model.add_argument(
        "--patch-size",
        type=positive_int_arg,
        help=f"built-in model: ViT patch side (default: {CPU_DEFAULTS.patch_size} on a CPU, "
        f"{GPU_DEFAULTS.patch_size} on a GPU)",
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--batch-size", type=positive_int_arg, default=8)
    timing.add_argument(
        "--rounds",
        type=positive_int_arg,
        help=f"interleaved rounds, each running every method for --steps steps (default: {CPU_DEFAULTS.rounds} on "
        f"a CPU, {GPU_DEFAULTS.rounds} on a GPU)",
    )
    timing.add_argument(
        "--steps",
        type=positive_int_arg,
        help=f"measured steps per method in each round (default: {CPU_DEFAULTS.steps} on a CPU, "
        f"{GPU_DEFAULTS.steps} on a GPU)",
    )
    timing.add_argument(
        "--warmup",
        type=positive_int_arg,
        help=f"discarded steps per method (default: {CPU_DEFAULTS.warmup} on a CPU, {GPU_DEFAULTS.warmup} on a GPU)",
    )
    timing.add_argument("--device", help="cpu or cuda[:N] (default: cuda if usable, else cpu)")
    timing.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    timing.add_argument(
        "--amp", choices=sorted(AMP_DTYPES), help="run the forward pass under torch.autocast in this dtype"
    )
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument(
        "--space",
        choices=SPACES,
        default="parameters",
        help="where the gradient methods take the per-task gradients: the shared parameters (default) or the "
        "shared representation (the model's closure must return (losses, features); the built-in model does)",
    )


@dataclass(frozen=True)
class RunSettings:
    """The parsed run options with the machine's defaults filled in."""

    config: BenchConfig
    factory: ModelFactory
    tasks: str | None  # the --tasks value given to the factory (None: the factory's default)
    defaults_note: str | None  # why the sizes are what they are, when the machine's defaults were used


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The options of :func:`add_run_arguments` with the machine's defaults filled in; :class:`UsageError` if wrong."""
    device = resolve_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    used_defaults = args.steps is None and args.rounds is None
    built_in_options = {"--backbone": args.backbone, "--img-size": args.img_size, "--patch-size": args.patch_size}
    if args.model is None:
        img_size = args.img_size or defaults.img_size
        patch_size = args.patch_size or defaults.patch_size
        if img_size % patch_size != 0:
            raise UsageError(f"--img-size {img_size} must be a multiple of --patch-size {patch_size}")
        factory: ModelFactory = functools.partial(
            vit_bench_model,
            backbone=args.backbone or defaults.backbone,
            img_size=img_size,
            patch_size=patch_size,
        )
        tasks = args.tasks or defaults.tasks
        try:
            parse_tasks(tasks)
        except ValueError as error:
            raise UsageError(str(error)) from None
        used_defaults = used_defaults and args.img_size is None and args.patch_size is None
    else:
        given = [name for name, value in built_in_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} configure the built-in model only, not --model {args.model}")
        factory = load_factory(args.model)
        tasks = args.tasks
    dtype = getattr(torch, args.dtype)
    if args.amp is not None and dtype != torch.float32:
        raise UsageError(f"--amp {args.amp} autocasts float32 weights; it cannot be used with --dtype {args.dtype}")
    config = BenchConfig(
        batch_size=args.batch_size,
        rounds=args.rounds or defaults.rounds,
        steps=args.steps or defaults.steps,
        warmup=args.warmup or defaults.warmup,
        device=device,
        dtype=dtype,
        seed=args.seed,
        amp=args.amp,
        space=args.space,
    )
    return RunSettings(config, factory, tasks, defaults.note if used_defaults else None)


def describe(settings: RunSettings) -> str:
    """One line saying what will run, plus why when the machine's defaults chose the sizes."""
    config = settings.config
    factory = settings.factory
    keywords = getattr(factory, "keywords", {})
    model = (
        f"{keywords['backbone']} at {keywords['img_size']} px / patch {keywords['patch_size']}"
        if getattr(factory, "func", None) is vit_bench_model
        else getattr(factory, "__qualname__", repr(factory))
    )
    amp = f" (autocast {config.amp})" if config.amp else ""
    amp += ", gradient methods in representation space" if config.space == "representation" else ""
    line = (
        f"tasks {settings.tasks or 'default'}, {model}, batch {config.batch_size}, "
        f"{str(config.dtype).removeprefix('torch.')}{amp} on {config.device}, {config.warmup} warm-up steps per "
        f"method, then {config.rounds} interleaved rounds × {config.steps} steps per method"
    )
    return line + (f"\n({settings.defaults_note})" if settings.defaults_note else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selgroup-bench",
        description="Per-batch timing breakdown (the phases of Jeong & Yoon, ICLR 2025, Table E.1) of every "
        "multi-task method, on the built-in ViT (one single-conv decoder per task) or on your own model (--model).",
    )
    parser.add_argument("--methods", help="comma-separated method names (default: every available method)")
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: bench_out)")
    parser.add_argument(
        "--sweep-tasks", type=_int_list, help="also time every method at each of these K (e.g. 2,4,8,16,32)"
    )
    return parser


def load_hint(load_average: float, cores: int, threads: int) -> str | None:
    """A warning when other jobs share the CPU (1-minute load average above the cores), else ``None``.

    >>> load_hint(1.5, 2, 2) is None
    True
    >>> hint = load_hint(12.0, 2, 2)
    >>> hint.startswith("note: load average 12.0 on 2 cores") and "OMP_NUM_THREADS=1" in hint
    True
    """
    if load_average <= cores:
        return None
    hint = (
        f"note: load average {load_average:.1f} on {cores} cores: other jobs share the CPU, so read the paired "
        "ratios (× GD), not the absolute times"
    )
    if threads > 1:
        hint += (
            f"; with {threads} torch threads, OMP_NUM_THREADS=1 avoids OpenMP barriers stalled on a descheduled thread"
        )
    return hint


def method_list(text: str | None) -> list[str]:
    """``--methods``: the names, checked against the methods of this installation."""
    if text is None:
        return default_methods()
    names = [name.strip() for name in text.split(",") if name.strip()]
    available = methods.available()
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise UsageError(
            f"unknown or unavailable method(s) {', '.join(unknown) or text!r}; available: {', '.join(available)}"
        )
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the bench; ``argv`` defaults to the command line. Returns 0; exits with status 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        method_names = method_list(args.methods)
        settings = run_settings(args)
        sweep = [str(k) for k in args.sweep_tasks or []]
        print(
            f"selgroup-bench: {', '.join(method_names)}; {describe(settings)}"
            + (f" (and the sweep K = {', '.join(sweep)})" if sweep else ""),
            file=sys.stderr,
        )
        hint = (
            load_hint(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
            if hasattr(os, "getloadavg")
            else None
        )
        if hint and settings.config.device.type == "cpu":
            print(hint, file=sys.stderr)
        from tqdm import tqdm

        config = settings.config
        total_steps = (1 + len(sweep)) * len(method_names) * (config.warmup + config.rounds * config.steps)
        with tqdm(total=total_steps, file=sys.stderr, unit="step", dynamic_ncols=True) as progress:
            suite = run_suite(method_names, config, settings.factory, [settings.tasks, *sweep], progress)
    except (UsageError, ModelError) as error:
        parser.error(str(error))  # prints the usage and "selgroup-bench: error: ...", exits with status 2
    extra = [settings.defaults_note] if settings.defaults_note else []
    written = write_outputs(suite, args.out, shlex.join(["selgroup-bench", *argv]), extra)
    print(f"\nwrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 0
