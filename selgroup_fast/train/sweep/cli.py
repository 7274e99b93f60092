"""``selgroup-train sweep PLAN``: runs a plan's unfinished runs, then writes its table.

Bad input (a malformed plan file, a flag, a folder of another sweep) is one ``error: ...`` line on
stderr and exit status 2; a failed run is reported in the table and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ...checks import positive_int_arg
from ...cli_common import UsageError
from .plan import Plan, PlanError, builtin_plans, load_plan
from .runs import LOG_NAME, Runner, check_resumable, execute, is_complete, prerender, runs_code, subprocess_runner
from .table import write_reports

#: The flags that override a field of the plan's size (``--train-arg`` adds to its ``extra``).
_SIZE_FLAGS = ("dataset", "backbone", "img_size", "patch_size", "batch_size", "iters", "lr", "eval_every")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a :class:`PlanError` (one ``error:`` line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise PlanError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selgroup-train sweep",
        description="Train every run of a plan (single-task baselines, methods, seeds, ablations), each with "
        "selgroup-train in its own subprocess and folder, then tabulate Δm, cost and grouping. Resumable: run the "
        "same command again after an interruption. See docs/training.md, 'Evidence sweeps'.",
    )
    add = parser.add_argument
    add("plan", help=f"a built-in plan ({', '.join(builtin_plans())}) or a plan file (JSON)")
    add("--out", required=True, type=Path, help="the sweep's folder (one sub-folder per run, the tables)")
    add("--jobs", type=positive_int_arg, default=1, help="runs at a time (default 1; a timing plan: 1 only)")
    add("--threads", type=positive_int_arg, help="torch threads per run (default: cores / jobs)")
    size = parser.add_argument_group("size", "override the plan's size (every run of the sweep)")
    size.add_argument("--dataset")
    size.add_argument("--backbone")
    size.add_argument("--img-size", type=positive_int_arg)
    size.add_argument("--patch-size", type=positive_int_arg)
    size.add_argument("--batch-size", type=positive_int_arg)
    size.add_argument("--iters", type=positive_int_arg)
    size.add_argument("--lr", type=float)
    size.add_argument("--eval-every", type=positive_int_arg, help="evaluate every N iterations (default: at the end)")
    size.add_argument(
        "--train-arg", action="append", default=[], help="one more selgroup-train argument for every run (repeatable)"
    )
    add("--baselines-only", action="store_true", help="run only the plan's single-task baselines (then the table)")
    add(
        "--scenes-cache",
        type=Path,
        help="render each scene once into this folder and read it back in every run (SELGROUP_SCENES_CACHE)",
    )
    add(
        "--prerender",
        action="store_true",
        help="render the scenes the plan's method runs share into --scenes-cache first (--jobs at a time)",
    )
    add("--table-only", action="store_true", help="write the table from the finished runs; run nothing")
    add("--dry-run", action="store_true", help="print the commands of the unfinished runs; run nothing")
    add("--note", action="append", default=[], help="a line for the table's header (repeatable)")
    return parser


def _plan_and_size(args: argparse.Namespace) -> Plan:
    """The plan with the size flags given on the command line applied to its size."""
    plan = load_plan(args.plan)
    changes = {name: getattr(args, name) for name in _SIZE_FLAGS if getattr(args, name) is not None}
    if args.train_arg:
        changes["extra"] = (*plan.size.extra, *args.train_arg)
    return dataclasses.replace(plan, size=dataclasses.replace(plan.size, **changes))


def main(argv: Sequence[str], runner: Runner = subprocess_runner) -> int:
    """Runs ``selgroup-train sweep`` with ``argv`` (the arguments after ``sweep``); returns the exit status."""
    argv = list(argv)
    try:
        args = build_parser().parse_args(argv)
        plan = _plan_and_size(args)
        if args.prerender and not args.scenes_cache:
            raise PlanError("--prerender needs --scenes-cache DIR")
        if plan.timing and args.jobs != 1:
            raise PlanError("a timing plan runs one method at a time: no --jobs")
        check_resumable(plan, args.out, plan.size)
        if args.dry_run:
            for run in plan.runs:
                if not is_complete(run, args.out):
                    print(shlex.join(["selgroup-train", *run.arguments(args.out, plan.size)]))
            return 0
        if args.scenes_cache:
            os.environ["SELGROUP_SCENES_CACHE"] = str(args.scenes_cache.resolve())
        if args.prerender and not args.table_only:
            prerender(plan, plan.size, args.scenes_cache, args.jobs, lambda line: print(line, flush=True))
        outcomes = []
        if not args.table_only:
            runs = tuple(run for run in plan.runs if run.is_baseline or not args.baselines_only)
            to_run = dataclasses.replace(plan, runs=runs)
            outcomes = execute(to_run, args.out, plan.size, jobs=args.jobs, threads=args.threads, runner=runner)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = shlex.join(["selgroup-train", "sweep", *argv])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(write_reports(plan, args.out, plan.size, command, args.note, date, runs_code(plan, args.out)))
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        print(f"{len(failed)} runs failed (see their {LOG_NAME})", file=sys.stderr)
    return 1 if failed else 0
