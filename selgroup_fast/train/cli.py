"""``selgroup-train`` (also ``python -m selgroup_fast.train``): a thin layer over :func:`fit`.

``selgroup-train [flags]`` trains one multi-task model; ``selgroup-train baseline [flags]``
trains one single-task model per task and writes ``baseline.json`` for ``--baseline``;
``selgroup-train sweep PLAN [flags]`` runs a plan of such runs and tabulates them (:mod:`.sweep`).
Bad input is one ``error: ...`` line on stderr and exit status 2; a non-finite loss with
``--on-nonfinite stop`` exits with 1 after checkpointing; SIGINT/SIGTERM checkpoint and exit
with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch.distributed as dist

from ..checks import positive_int_arg
from ..cli_common import UsageError
from ..tasks import PRESETS
from .config import (
    AMP_MODES,
    DATA_CACHE_MODES,
    ON_NONFINITE,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    TrainError,
    parse_method_option,
)
from .loop import Interrupted, NonFiniteLoss, fit, fit_baseline


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a :class:`TrainError` (one ``error:`` line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise TrainError(f"{message} (see {self.prog} --help)")


def _method_option(text: str) -> tuple[str, Any]:
    try:
        return parse_method_option(text)
    except TrainError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--method-option ")) from None


def build_parser(baseline: bool = False) -> argparse.ArgumentParser:
    prog = "selgroup-train baseline" if baseline else "selgroup-train"
    description = (
        "Train one single-task model per task (plain GD, same model, data and schedule) and write "
        "OUT/baseline.json, the file --baseline reads."
        if baseline
        else "Multi-task training with the selective task group update (Jeong & Yoon, ICLR 2025) or a baseline "
        "method. With no arguments: the selective method on the built-in scenes dataset (NYUD tasks) at a "
        "small CPU size, or the paper's settings on a GPU. 'selgroup-train baseline --help' for Δm's baseline, "
        "'selgroup-train sweep --help' for a sweep of runs."
    )
    parser = _Parser(prog=prog, description=description)
    add = parser.add_argument
    add("--dataset", default="scenes", help="scenes (built-in, default), nyud or nyud_npy (from --data-root)")
    add("--data-root", help="the dataset's folder on disk (real datasets)")
    add(
        "--tasks",
        default="nyud",
        help=f"a preset ({', '.join(PRESETS)}), PRESET:NAME,... (some of its tasks) or comma-separated task names "
        "(the tasks of the preset named like the dataset; default nyud)",
    )
    if not baseline:
        add("--method", default="selective", help="a name of selgroup_fast.methods.available() (default selective)")
        add(
            "--method-option",
            type=_method_option,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="an option of the method, repeatable (e.g. decay=1e-4, warmup_steps=50, c=0.4)",
        )
    add(
        "--backbone",
        help="a timm ViT name, randomly initialised (default: test_vit on a CPU, vit_small_patch16_224 on a GPU)",
    )
    add("--img-size", type=positive_int_arg, help="image side in pixels (default: 32 on a CPU, 224 on a GPU)")
    add("--patch-size", type=positive_int_arg, help="ViT patch side (default: 8 on a CPU, 16 on a GPU)")
    add("--batch-size", type=positive_int_arg, default=8, help="images per batch and process (default 8)")
    add("--iters", type=positive_int_arg, help="training iterations (default: 300 on a CPU, 40000 on a GPU)")
    add("--lr", type=float, help="learning rate (default: 1e-3 on a CPU, the paper's 2e-5 on a GPU)")
    add("--weight-decay", type=float, help="weight decay (default 1e-6)")
    add("--optimizer", choices=OPTIMIZERS, default="adam")
    add("--schedule", choices=SCHEDULES, default="poly", help="poly (power 0.9, the paper's) or constant")
    add("--eval-every", type=positive_int_arg, help="evaluate every N iterations (default: iters / 5)")
    add("--eval-batches", type=positive_int_arg, help="evaluate on the first N validation batches (default: all)")
    add("--checkpoint-every", type=positive_int_arg, help="checkpoint every N iterations (default: 100 CPU, 1000 GPU)")
    add(
        "--resume",
        nargs="?",
        const="auto",
        metavar="FILE",
        help="continue from FILE, or without FILE from OUT/checkpoint.pt when it exists",
    )
    add(
        "--amp",
        choices=AMP_MODES,
        default="off",
        help="mixed precision (fp16 scales the losses with a GradScaler, every method)",
    )
    add("--compile", action="store_true", help="torch.compile the model")
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add("--seed", type=int, default=0)
    add(
        "--workers",
        type=int,
        help="DataLoader worker processes rendering/reading batches ahead of the step "
        "(default: 1 on a CPU, 4 on a GPU; 0: in the training process)",
    )
    add(
        "--data-cache",
        choices=DATA_CACHE_MODES,
        default="auto",
        help="render the built-in scenes training split once into memory, each scene straight from the "
        "worker into shared tensors (no per-batch transfer; the same batches): auto (default) when it takes "
        "at most 1 GiB (117 MiB at 32 px with the NYUD tasks, 5.6 GiB at 224 px), on at any size, off",
    )
    add("--out", default="baseline_out" if baseline else "train_out", help="output folder")
    if not baseline:
        add("--baseline", metavar="FILE", help="a baseline.json from 'selgroup-train baseline': adds Δm to the results")
    add(
        "--on-nonfinite",
        choices=tuple(ON_NONFINITE),
        default="stop",
        help="a NaN/inf loss: stop (default; after checkpointing the last good state), skip the step "
        "(on the device; counted and logged) or propagate it",
    )
    add("--log-every", type=positive_int_arg, default=10, help="log losses, affinity and timings every N iterations")
    add("--quiet", action="store_true", help="no progress bar, no summary")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args)
    return TrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        tasks=args.tasks,
        method=values.get("method", "gd"),
        method_options=dict(values.get("method_option", [])),
        backbone=args.backbone,
        img_size=args.img_size,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        iters=args.iters,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        schedule=args.schedule,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        amp=args.amp,
        compile=args.compile,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        data_cache=args.data_cache,
        out=args.out,
        baseline=values.get("baseline"),
        on_nonfinite=args.on_nonfinite,
        log_every=args.log_every,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from .sweep.cli import main as sweep_main

        return sweep_main(argv[1:])
    baseline = bool(argv) and argv[0] == "baseline"
    from ..data import DataError

    try:
        config = config_from_args(build_parser(baseline).parse_args(argv[1:] if baseline else argv))
        if baseline:
            fit_baseline(config)
            print(f"baseline written to {config.out}/baseline.json", file=sys.stderr)
        else:
            fit(config)
    except (UsageError, DataError) as error:  # a TrainError, or --device's UsageError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        stop = f"; the last good state is in {config.out}/checkpoint.pt"
        print(f"error: {error}{stop}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 128 + error.signum
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
