"""Trains single-task baselines and multi-task methods with ``selgroup-train`` and tabulates the evidence.

Issue 12: does the selective update beat the baselines, at what cost? For every preset it
runs ``selgroup-train baseline`` (one single-task model per task) and every requested
method variant and seed through the CLI, each in its own subprocess and folder, then
writes one table (``table.md``, ``table.csv``, ``table.json``): each task's primary
metric, Δm against the single-task baselines (mean ± sample std over seeds), time per
training batch and its ratio to GD, the selective method's average number of groups,
how often the tasks the dataset relates by construction were grouped, and the numbers
behind each of the paper's claims.

A method variant is ``NAME[:KEY=VALUE[,KEY=VALUE...]]``; each ``KEY=VALUE`` becomes one
``--method-option KEY=VALUE`` of ``selgroup-train`` (e.g. ``selective:order=backward``,
``selective:grouping=random:2``, ``selective:decay=1e-4``,
``selective:attribution=reference``). The keys are checked against the method's
constructor before anything runs.

Runs are resumable: a folder whose run finished (its ``results.json`` or ``baseline.json``
is complete and its ``command.json`` holds the same command) is not redone, an unfinished
one (a killed sweep) is deleted and redone, and a finished one made by another command is
refused. Every method run gets the same size flags and hyper-parameters; only the seed
and the method differ. Δm is computed here, from each run's metrics and the preset's
``baseline.json``, with ``selgroup_fast.metrics.delta_m`` (the trainer's definition), so
runs do not wait for the baselines. Checkpoints and TensorBoard event files are deleted
once a run has finished (the committed results keep ``results.json``, ``metrics.jsonl``,
the command, the tail of the log and, for the selective method, the trainer's plots).

Usage::

    PYTHONPATH=. python benchmarks/train_table.py --plan issue12 --out benchmarks/results/train_sweep --jobs 2
    PYTHONPATH=. python benchmarks/train_table.py --presets nyud --methods gd,selective,selective:order=backward \\
        --seeds 0,1 --iters 200 --out /tmp/sweep
    PYTHONPATH=. python benchmarks/train_table.py --plan issue12 --out benchmarks/results/train_sweep --table-only
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selgroup_fast.cli_common import markdown_table
from selgroup_fast.tasks import PRESETS

REPO = Path(__file__).resolve().parents[1]

#: A runner executes one command (argv) with an environment, writing its output to a log
#: file, and returns the exit status. Tests pass a fake one.
Runner = Callable[[list[str], dict[str, str], Path], int]

#: Pairs of tasks that the ``scenes`` dataset relates by construction (issue 9): same
#: geometry (the two depths), normals and the shading they produce, occlusion edges and
#: depth discontinuities; for NYUD, depth and the normals derived from it.
KNOWN_RELATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "taskonomy": (
        ("depth_euclidean", "depth_zbuffer"),
        ("normal", "reshading"),
        ("depth_zbuffer", "edge_occlusion"),
    ),
    "nyud": (("depth", "normals"),),
}

#: The files a finished run keeps; checkpoints and event files go (they are large and
#: only serve a resume, which a finished run no longer needs).
PRUNED_PATTERNS = ("*.pt", "*.pth", "*.ckpt", "*.ckpt.tmp", "*.tmp", "events.out.tfevents.*")
HISTORY_NAME = "history.json"
LOG_NAME = "train.log"
LOG_TAIL_LINES = 40
COMMAND_NAME = "command.json"


# --------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class Variant:
    """A method and its ``--method-option`` settings, e.g. ``selective:grouping=random:2``."""

    method: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``NAME[:KEY=VALUE[,KEY=VALUE...]]`` -> Variant (options split at commas that start a ``KEY=``).

        >>> Variant.parse("selective:grouping=random:2,decay=1e-4")
        Variant(method='selective', options=(('grouping', 'random:2'), ('decay', '1e-4')))
        >>> Variant.parse("gd").label
        'gd'
        """
        method, _, rest = text.strip().partition(":")
        if not method:
            raise ValueError(f"a method variant needs a method name, got {text!r}")
        options = []
        for item in re.split(r",(?=[A-Za-z_]\w*=)", rest) if rest else []:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"method options are KEY=VALUE, got {item!r} in {text!r}")
            options.append((key.strip(), value.strip()))
        return cls(method, tuple(options))

    @property
    def label(self) -> str:
        """The text :meth:`parse` reads back."""
        if not self.options:
            return self.method
        return self.method + ":" + ",".join(f"{key}={value}" for key, value in self.options)

    @property
    def folder_name(self) -> str:
        """A file-system-safe name: ``selective__grouping-random_2``."""
        parts = [self.method, *(f"{key}-{value}" for key, value in self.options)]
        return re.sub(r"[^A-Za-z0-9_.\-]", "_", "__".join(parts))


@dataclass(frozen=True)
class Size:
    """The flags every run of a sweep shares (model, data, schedule): the same budget for all."""

    backbone: str
    img_size: int
    patch_size: int
    batch_size: int
    iters: int
    lr: float
    eval_every: int
    dataset: str = "scenes"
    # The trainer's defaults, written out so that a later change of a default cannot mix two settings.
    weight_decay: float = 1e-6
    optimizer: str = "adam"
    schedule: str = "poly"
    # Data loaded in the training process, between the timed steps: no worker competes with the step.
    workers: int = 0
    extra: tuple[str, ...] = ()

    def flags(self) -> list[str]:
        return [
            "--dataset",
            self.dataset,
            "--backbone",
            self.backbone,
            "--img-size",
            str(self.img_size),
            "--patch-size",
            str(self.patch_size),
            "--batch-size",
            str(self.batch_size),
            "--iters",
            str(self.iters),
            "--lr",
            repr(self.lr),
            "--weight-decay",
            repr(self.weight_decay),
            "--optimizer",
            self.optimizer,
            "--schedule",
            self.schedule,
            "--eval-every",
            str(self.eval_every),
            "--checkpoint-every",
            str(self.iters),
            "--workers",
            str(self.workers),
            *self.extra,
        ]


@dataclass(frozen=True)
class Run:
    """One subprocess: the single-task baselines of a preset (``variant`` None) or one method seed."""

    preset: str
    variant: Variant | None
    seed: int

    @property
    def is_baseline(self) -> bool:
        return self.variant is None

    def folder(self, root: Path) -> Path:
        if self.variant is None:
            return root / self.preset / "baseline"
        return root / self.preset / self.variant.folder_name / f"seed{self.seed}"

    def result_file(self, root: Path) -> Path:
        return self.folder(root) / ("baseline.json" if self.is_baseline else "results.json")

    def arguments(self, root: Path, size: Size) -> list[str]:
        """The ``selgroup-train`` arguments of this run."""
        head = ["baseline"] if self.variant is None else []
        method = []
        if self.variant is not None:
            method = ["--method", self.variant.method]
            for key, value in self.variant.options:
                method += ["--method-option", f"{key}={value}"]
        out = ["--seed", str(self.seed), "--out", str(self.folder(root))]
        return [*head, "--tasks", self.preset, *method, *size.flags(), *out]


@dataclass(frozen=True)
class Plan:
    """Presets, the method variants of each preset with their seeds, and the baseline seed."""

    runs: tuple[Run, ...]
    #: per preset: the ablation groups (title, option key, default value, labels), for the table.
    ablations: dict[str, tuple[tuple[str, str, str, tuple[str, ...]], ...]] = field(default_factory=dict)


NYUD_METHODS = ("pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl", "uw", "dwa", "famo")

#: Table 4 / D.5 / Figure 4 ablations of the selective method on NYUD: (title, key,
#: the method's default, the variants). The default's row is the plain ``selective`` run.
ISSUE12_ABLATIONS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("group order", "order", "random", ("selective:order=forward", "selective:order=backward")),
    (
        "grouping",
        "grouping",
        "affinity",
        ("selective:grouping=joint", "selective:grouping=separate", "selective:grouping=random:2"),
    ),
    ("affinity decay β", "decay", "1e-3", ("selective:decay=1e-2", "selective:decay=1e-4")),
    ("attribution", "attribution", "paper", ("selective:attribution=reference",)),
)


def issue12_plan(main_seeds: int = 3, other_seeds: int = 3, ablation_seeds: int = 2, taskonomy_seeds: int = 2) -> Plan:
    """Issue 12's whole sweep: NYUD (baselines, 11 methods, the selective ablations) and Taskonomy.

    The issue's minimum comes first (NYUD: gd and selective at 3 seeds, every other method and
    ablation at 1; Taskonomy: gd and selective at 2, pcgrad at 1), then the further seeds (up to
    ``other_seeds`` for the other NYUD methods, ``ablation_seeds`` for the ablations and
    ``taskonomy_seeds`` for Taskonomy's pcgrad), so that a sweep cut short still holds the minimum.

    >>> plan = issue12_plan()
    >>> sum(run.is_baseline for run in plan.runs), len(plan.runs)
    (2, 57)
    """
    nyud_methods = [Variant(method) for method in NYUD_METHODS]
    ablations = [Variant.parse(label) for _, _, _, labels in ISSUE12_ABLATIONS for label in labels]
    runs: list[Run] = [Run("nyud", None, 0), Run("taskonomy", None, 0)]
    for method in ("gd", "selective"):
        runs += [Run("nyud", Variant(method), seed) for seed in range(main_seeds)]
    runs += [Run("nyud", variant, 0) for variant in [*nyud_methods, *ablations]]
    for method in ("gd", "selective"):
        runs += [Run("taskonomy", Variant(method), seed) for seed in range(taskonomy_seeds)]
    runs.append(Run("taskonomy", Variant("pcgrad"), 0))
    for seed in range(1, max(other_seeds, ablation_seeds, taskonomy_seeds)):
        runs += [Run("nyud", variant, seed) for variant in nyud_methods if seed < other_seeds]
        runs += [Run("nyud", variant, seed) for variant in ablations if seed < ablation_seeds]
        runs += [Run("taskonomy", Variant("pcgrad"), seed) for _ in range(1) if seed < taskonomy_seeds]
    return Plan(tuple(runs), {"nyud": ISSUE12_ABLATIONS})


def custom_plan(presets: Sequence[str], variants: Sequence[Variant], seeds: Sequence[int]) -> Plan:
    """Every variant at every seed on every preset, plus each preset's baselines (at the first seed)."""
    runs = [Run(preset, None, seeds[0]) for preset in presets]
    runs += [Run(preset, variant, seed) for preset in presets for variant in variants for seed in seeds]
    return Plan(tuple(runs))


def timing_plan(preset: str, variants: Sequence[Variant], rounds: int) -> Plan:
    """``rounds`` rounds of every variant, one run each at seed = the round, the order rotated every round.

    Run one at a time, the rounds interleave the methods so that a change of the machine's
    load hits all of them alike; each round's ratios to GD are taken within the round.

    >>> [(run.variant.label, run.seed) for run in timing_plan("nyud", [Variant("gd"), Variant("pcgrad")], 2).runs]
    [('gd', 0), ('pcgrad', 0), ('pcgrad', 1), ('gd', 1)]
    """
    runs = []
    for round_ in range(rounds):
        shift = round_ % len(variants)
        runs += [Run(preset, variant, round_) for variant in [*variants[shift:], *variants[:shift]]]
    return Plan(tuple(runs))


def _render_split(dataset: str, tasks: tuple[str, ...], img_size: int, seed: int, split: str, cache: str) -> int:
    from selgroup_fast.data import build_dataset

    data = build_dataset(dataset, split, tasks, img_size, seed=seed, cache_dir=cache)
    for index in range(len(data)):  # type: ignore[arg-type]
        data[index]
    return len(data)  # type: ignore[arg-type]


def splits_to_render(plan: Plan) -> list[tuple[tuple[str, ...], int, str]]:
    """(task set, seed, split) of every ``scenes`` split that the plan's method runs share, once each.

    The trainer draws the scenes from ``--seed`` and the cache is keyed by the task set: one train and
    one val split per preset and seed. The single-task baselines' splits (one task each) are read by
    one run only, so they are rendered as that run goes.

    >>> plan = custom_plan(["nyud", "taskonomy"], [Variant("gd"), Variant("selective")], [0, 1])
    >>> [(len(tasks), seed, split) for tasks, seed, split in splits_to_render(plan)]
    [(4, 0, 'train'), (4, 0, 'val'), (4, 1, 'train'), (4, 1, 'val'), (11, 0, 'train'), (11, 0, 'val'), (11, 1, 'train'), (11, 1, 'val')]
    """
    wanted = {
        (tuple(spec.name for spec in PRESETS[run.preset]), run.seed): None for run in plan.runs if not run.is_baseline
    }
    return [(tasks, seed, split) for tasks, seed in wanted for split in ("train", "val")]


def prerender(plan: Plan, size: Size, cache: Path, jobs: int, echo: Callable[[str], None]) -> None:
    """Renders every ``scenes`` split the plan's runs will read into the on-disk cache, ``jobs`` at a time.

    Rendering is deterministic: a cached scene is the scene, and the runs then only read files.
    """
    from concurrent.futures import ProcessPoolExecutor

    work = splits_to_render(plan)
    echo(f"rendering {len(work)} splits into {cache}, {jobs} at a time")
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(_render_split, size.dataset, tasks, size.img_size, seed, split, str(cache))
            for tasks, seed, split in work
        ]
        for (tasks, seed, split), future in zip(work, futures, strict=False):
            echo(
                f"  {'+'.join(tasks) if len(tasks) < 3 else f'{len(tasks)} tasks'} seed {seed} {split}: {future.result()} scenes"
            )


def check_variant(variant: Variant) -> None:
    """Refuses an unknown method or an option it does not take (before anything runs).

    The method is built once, as the trainer builds it, on a tiny stand-in model: the
    options are then checked by the method itself (its constructor or its op), not by a
    second list of them here.
    """
    import torch

    from selgroup_fast import methods
    from selgroup_fast.train.config import parse_method_option, unknown_option

    if variant.method not in methods.available():
        raise ValueError(f"unknown method {variant.method!r}; available: {', '.join(methods.available())}")
    options = dict(parse_method_option(f"{key}={value}") for key, value in variant.options)
    encoder, heads = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD([*encoder.parameters(), *heads.parameters()], lr=0.1)
    try:
        methods.create(variant.method, optimizer, 3, shared_params=list(encoder.parameters()), **options)
    except TypeError as error:
        key = unknown_option(error)
        if key is not None:
            raise ValueError(f"method {variant.method!r} takes no option {key!r}") from None
        raise ValueError(f"method {variant.method!r}: {error}") from None
    except ValueError as error:
        raise ValueError(f"method {variant.method!r}: {error}") from None


# --------------------------------------------------------------------------- running


def subprocess_runner(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Runs ``argv`` with ``env``, its stdout and stderr going to ``log``."""
    with open(log, "w") as stream:
        return subprocess.run(argv, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode


def is_complete(run: Run, root: Path) -> bool:
    """Whether the run's result file exists, parses and holds metrics for every task of its preset."""
    try:
        record = json.loads(run.result_file(root).read_text())
    except (OSError, ValueError):
        return False
    tasks = {spec.name for spec in PRESETS[run.preset]}
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or set(metrics) != tasks:
        return False
    return run.is_baseline or isinstance(record.get("time_per_batch_s"), (int, float))


def _recorded_command(folder: Path) -> list[str] | None:
    try:
        return json.loads((folder / COMMAND_NAME).read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _settings(arguments: list[str] | None) -> list[str] | None:
    """A run's arguments less its ``--out`` folder (a sweep folder may be moved or read from elsewhere)."""
    if arguments is None or "--out" not in arguments:
        return arguments
    at = arguments.index("--out")
    return arguments[:at] + arguments[at + 2 :]


def check_resumable(plan: Plan, root: Path, size: Size) -> None:
    """Refuses to mix runs: a finished folder must hold this sweep's command."""
    for run in plan.runs:
        folder = run.folder(root)
        if is_complete(run, root) and _settings(_recorded_command(folder)) != _settings(run.arguments(root, size)):
            raise ValueError(
                f"{folder} holds a finished run of another command (see its {COMMAND_NAME}); "
                "use another --out or delete that folder"
            )


def keep_history(folder: Path) -> None:
    """Saves a grouping run's number of groups per batch and affinity snapshots as ``history.json``.

    They come from the trainer's final checkpoint (its ``history``), which :func:`prune` deletes next.
    """
    record = read_json(folder / "results.json")
    checkpoint = folder / "checkpoint.pt"
    if not record or "cogrouping" not in record or not checkpoint.is_file():
        return
    import torch

    try:
        history = json.loads(torch.load(checkpoint, map_location="cpu", weights_only=True)["history"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return
    snapshots = [[float(f"{value:.5g}") for value in snapshot] for snapshot in history.get("affinity", [])]
    kept = {
        "tasks": record.get("tasks"),
        "groups": history.get("groups", []),
        "affinity_steps": history.get("affinity_steps", []),
        "affinity": snapshots,
    }
    (folder / HISTORY_NAME).write_text(json.dumps(kept) + "\n")


def grouping_dynamics(history: dict[str, Any], post_warmup_batches: int) -> dict[str, float | None]:
    """How settled the grouping was after warm-up, and how much the tracked affinity moved.

    ``groups_after_warmup``: the mean number of groups per batch after warm-up;
    ``group_count_changes``: the fraction of consecutive post-warm-up batches whose number of
    groups differs; ``affinity_fluctuation``: the mean absolute change of an affinity entry
    between consecutive snapshots over the mean absolute entry (0: frozen).

    >>> grouping_dynamics({"groups": [4, 4, 2, 2, 3, 3], "affinity": [[1.0, -1.0], [1.0, -3.0]]}, 4)
    {'groups_after_warmup': 2.5, 'group_count_changes': 0.3333333333333333, 'affinity_fluctuation': 0.6666666666666666}
    """
    groups = history.get("groups") or []
    after = groups[len(groups) - post_warmup_batches :] if post_warmup_batches else []
    changes = [a != b for a, b in itertools.pairwise(after)]
    snapshots = history.get("affinity") or []
    steps = [abs(b - a) for before, now in itertools.pairwise(snapshots) for a, b in zip(before, now, strict=False)]
    scale = statistics.fmean(abs(value) for snapshot in snapshots for value in snapshot) if snapshots else 0.0
    return {
        "groups_after_warmup": statistics.fmean(after) if after else None,
        "group_count_changes": statistics.fmean(changes) if changes else None,
        "affinity_fluctuation": statistics.fmean(steps) / scale if steps and scale > 0 else None,
    }


def prune(folder: Path) -> None:
    """Deletes checkpoints and event files; keeps the log's tail only."""
    for pattern in PRUNED_PATTERNS:
        for path in folder.rglob(pattern):
            if path.is_file():
                path.unlink()
    log = folder / LOG_NAME
    if log.is_file():
        # Progress bars redraw with carriage returns: keep the last state of each line.
        lines = [line.rsplit("\r", 1)[-1] for line in log.read_text(errors="replace").splitlines()]
        log.write_text("\n".join(lines[-LOG_TAIL_LINES:]) + "\n")


def last_error_line(folder: Path) -> str:
    """The log's last line that says what went wrong (``error: ...`` or an exception), else its last line."""
    try:
        lines = [line.strip() for line in (folder / LOG_NAME).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else "empty log"


@dataclass
class Outcome:
    run: Run
    status: str  # "done", "skipped" (finished earlier) or "failed"
    seconds: float = 0.0
    message: str = ""


def execute(
    plan: Plan,
    root: Path,
    size: Size,
    *,
    jobs: int = 1,
    threads: int | None = None,
    runner: Runner = subprocess_runner,
    python: str = sys.executable,
    echo: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[Outcome]:
    """Runs every unfinished run of ``plan`` (``jobs`` at a time), each in a fresh folder.

    Holds an exclusive lock on ``root/.lock`` meanwhile: a second sweep on the same folder would
    take the first one's runs in progress for unfinished ones and delete them.
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another train_table.py is running on {root}") from None
        return _execute(plan, root, size, jobs, threads, runner, python, echo)


def _execute(
    plan: Plan,
    root: Path,
    size: Size,
    jobs: int,
    threads: int | None,
    runner: Runner,
    python: str,
    echo: Callable[[str], None],
) -> list[Outcome]:
    check_resumable(plan, root, size)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    code = code_version()
    pending = [run for run in plan.runs if not is_complete(run, root)]
    outcomes = [Outcome(run, "skipped") for run in plan.runs if is_complete(run, root)]
    echo(f"{len(outcomes)} of {len(plan.runs)} runs already finished; {len(pending)} to run, {jobs} at a time")
    lock = threading.Lock()

    def one(run: Run) -> Outcome:
        folder = run.folder(root)
        if folder.exists():  # an unfinished run: start it again from scratch
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        arguments = run.arguments(root, size)
        argv = [python, "-m", "selgroup_fast.train", *arguments]
        record = {"arguments": arguments, "argv": argv, "code": code}
        (folder / COMMAND_NAME).write_text(json.dumps(record, indent=1) + "\n")
        begin = time.perf_counter()
        status = runner(argv, env, folder / LOG_NAME)
        seconds = time.perf_counter() - begin
        ok = status == 0 and is_complete(run, root)
        message = "" if ok else f"exit status {status}: {last_error_line(folder)}"
        keep_history(folder)
        prune(folder)
        outcome = Outcome(run, "done" if ok else "failed", seconds, message)
        with lock:
            label = "baselines" if run.is_baseline else f"{run.variant.label} seed {run.seed}"  # type: ignore[union-attr]
            echo(f"[{run.preset}] {label}: {outcome.status} in {seconds:.0f} s {message}".rstrip())
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes += list(pool.map(one, pending))
    return outcomes


# --------------------------------------------------------------------------- reading the runs


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [value for value in values if value is not None and math.isfinite(value)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _mean_matrix(matrices: Sequence[Sequence[Sequence[float]]]) -> list[list[float]] | None:
    if not matrices:
        return None
    size = len(matrices[0])
    return [[statistics.fmean(m[i][j] for m in matrices) for j in range(size)] for i in range(size)]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(plan: Plan, root: Path) -> dict[str, Any]:
    """Per preset and variant: metrics, Δm (mean, std, per seed), cost, groups, co-grouping; and the claims."""
    from selgroup_fast.metrics import delta_m, delta_m_all

    presets: dict[str, Any] = {}
    environment: dict[str, Any] = {}
    for preset in dict.fromkeys(run.preset for run in plan.runs):
        tasks = [spec.name for spec in PRESETS[preset]]
        baseline_run = next((run for run in plan.runs if run.preset == preset and run.is_baseline), None)
        baseline = (
            read_json(baseline_run.result_file(root)) if baseline_run and is_complete(baseline_run, root) else None
        )
        rows: dict[str, Any] = {}
        if baseline is not None:
            rows["single-task"] = {
                "label": "single-task",
                "seeds": [baseline_run.seed],  # type: ignore[union-attr]
                "primary": {task: baseline["metrics"][task][baseline["primary"][task]] for task in tasks},
                "primary_std": {task: None for task in tasks},
                "delta_m": 0.0,
                "delta_m_std": None,
                "delta_m_per_seed": [0.0],
            }
        labels = dict.fromkeys(run.variant.label for run in plan.runs if run.preset == preset and run.variant)
        for label in labels:
            runs = [run for run in plan.runs if run.preset == preset and run.variant and run.variant.label == label]
            records = [(run.seed, read_json(run.result_file(root))) for run in runs if is_complete(run, root)]
            failed = [
                {"seed": run.seed, "error": last_error_line(run.folder(root))}
                for run in runs
                if not is_complete(run, root) and run.folder(root).exists()
            ]
            row: dict[str, Any] = {"label": label, "seeds": [seed for seed, _ in records], "failed": failed}
            if records:
                environment = environment or {key: records[0][1].get(key) for key in ("machine", "versions")}
                primary_name = records[0][1]["primary"]
                row["primary"], row["primary_std"] = {}, {}
                for task in tasks:
                    row["primary"][task], row["primary_std"][task] = _mean_std(
                        [record["metrics"][task][primary_name[task]] for _, record in records]
                    )
                if baseline is not None:
                    per_seed = [
                        delta_m(
                            record["metrics"], baseline["metrics"], baseline["higher_is_better"], baseline["primary"]
                        )
                        for _, record in records
                    ]
                    per_seed_all = [
                        delta_m_all(record["metrics"], baseline["metrics"], baseline["higher_is_better"])
                        for _, record in records
                    ]
                    row["delta_m_per_seed"] = per_seed
                    row["delta_m"], row["delta_m_std"] = _mean_std(per_seed)
                    row["delta_m_all"], row["delta_m_all_std"] = _mean_std(per_seed_all)
                row["time_per_batch_s"], row["time_per_batch_std"] = _mean_std(
                    [record["time_per_batch_s"] for _, record in records]
                )
                row["wall_time_s"] = sum(record.get("wall_time_s") or 0.0 for _, record in records)
                groups = [record.get("groups_mean") for _, record in records]
                row["groups_mean"], row["groups_std"] = _mean_std([g for g in groups if g is not None])
                cogrouping = [record["cogrouping"] for _, record in records if record.get("cogrouping")]
                row["cogrouping"] = _mean_matrix(cogrouping)
                row["cogrouping_per_seed"] = cogrouping
                row["affinity"] = _mean_matrix([record["affinity"] for _, record in records if record.get("affinity")])
                dynamics = [
                    grouping_dynamics(history, record.get("cogrouping_batches", 0))
                    for run, (_, record) in zip([run for run in runs if is_complete(run, root)], records, strict=False)
                    if (history := read_json(run.folder(root) / HISTORY_NAME)) is not None
                ]
                for key in ("groups_after_warmup", "group_count_changes", "affinity_fluctuation"):
                    row[key], row[f"{key}_std"] = _mean_std([d[key] for d in dynamics if d[key] is not None])
            rows[label] = row
        gd = rows.get("gd", {})
        gd_time = gd.get("time_per_batch_s")
        gd_by_seed = dict(zip(gd.get("seeds", []), gd.get("delta_m_per_seed", []), strict=False))
        for row in rows.values():
            time_per_batch = row.get("time_per_batch_s")
            row["times_gd"] = time_per_batch / gd_time if time_per_batch is not None and gd_time else None
            # Paired by seed: runs of one seed share the initial weights, the data order and the validation
            # scenes (the trainer draws them from --seed), so their difference cancels what the seed adds.
            paired = [
                value - gd_by_seed[seed]
                for seed, value in zip(row.get("seeds", []), row.get("delta_m_per_seed", []), strict=False)
                if seed in gd_by_seed and row["label"] != "single-task"
            ]
            row["vs_gd_per_seed"] = paired
            row["vs_gd"], row["vs_gd_std"] = _mean_std(paired)
        presets[preset] = {
            "tasks": tasks,
            "primary": baseline["primary"] if baseline else None,
            "higher_is_better": baseline["higher_is_better"] if baseline else None,
            "rows": rows,
            "relations": relations(preset, tasks, rows.get("selective")),
            "ablations": [
                {"title": title, "key": key, "default": default, "labels": ["selective", *labels]}
                for title, key, default, labels in plan.ablations.get(preset, ())
            ],
        }
    return {"presets": presets, **environment, "claims": claims(presets)}


def relations(preset: str, tasks: list[str], selective: dict[str, Any] | None) -> dict[str, Any] | None:
    """How often the dataset's related task pairs were grouped, ranked among all pairs (1 = most often)."""
    if not selective or not selective.get("cogrouping"):
        return None
    matrix = selective["cogrouping"]
    pairs = sorted(
        ((matrix[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))), reverse=True
    )
    ranking = [{"pair": [a, b], "frequency": value} for value, a, b in pairs]
    checked = []
    for a, b in KNOWN_RELATIONS.get(preset, ()):
        i, j = tasks.index(a), tasks.index(b)
        per_seed = [m[i][j] for m in selective["cogrouping_per_seed"]]
        rank = 1 + sum(value > matrix[i][j] for value, _, _ in pairs)
        checked.append(
            {
                "pair": [a, b],
                "frequency": matrix[i][j],
                "per_seed": per_seed,
                "rank": rank,
                "of": len(pairs),
                "affinity": None
                if not selective.get("affinity")
                else [selective["affinity"][i][j], selective["affinity"][j][i]],
            }
        )
    mean_pair = statistics.fmean(value for value, _, _ in pairs) if pairs else None
    return {"ranking": ranking, "known": checked, "mean_pair_frequency": mean_pair}


def claims(presets: dict[str, Any]) -> dict[str, Any]:
    """The numbers behind each of the paper's claims (the verdicts are written by a person)."""
    out: dict[str, Any] = {}
    for name, preset in presets.items():
        rows = {label: row for label, row in preset["rows"].items() if row.get("delta_m") is not None}
        methods = {label: row for label, row in rows.items() if ":" not in label and label != "single-task"}
        ranked = sorted(methods, key=lambda label: methods[label]["delta_m"], reverse=True)
        selective = methods.get("selective", {})
        entry: dict[str, Any] = {
            "delta_m_ranking": [
                {
                    "method": label,
                    "delta_m": methods[label]["delta_m"],
                    "std": methods[label]["delta_m_std"],
                    "seeds": len(methods[label]["seeds"]),
                    "times_gd": methods[label].get("times_gd"),
                    "vs_gd": methods[label].get("vs_gd"),
                    "vs_gd_per_seed": methods[label].get("vs_gd_per_seed"),
                }
                for label in ranked
            ],
            "selective_rank": (ranked.index("selective") + 1) if "selective" in ranked else None,
            "selective_times_gd": selective.get("times_gd"),
            "selective_groups_mean": selective.get("groups_mean"),
        }
        for ablation in preset["ablations"]:
            entry[ablation["key"]] = [
                {
                    "variant": label,
                    "delta_m": rows[label]["delta_m"],
                    "std": rows[label]["delta_m_std"],
                    "per_seed": rows[label]["delta_m_per_seed"],
                    "seeds": rows[label]["seeds"],
                    "vs_gd_per_seed": rows[label].get("vs_gd_per_seed"),
                    "groups_mean": rows[label].get("groups_mean"),
                }
                for label in ablation["labels"]
                if label in rows
            ]
        out[name] = entry
    return out


# --------------------------------------------------------------------------- writing the table


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    small_or_large = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
    return f"{value:.{digits}g}" if small_or_large else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:+.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def preset_rows(preset: dict[str, Any], labels: Iterable[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table: Δm, each task's primary metric, time per batch, × GD, groups."""
    primary = preset["primary"] or {}
    hib = preset["higher_is_better"] or {}
    header = ["method", "seeds", "Δm (%)", "Δm − GD's, same seed", "Δm all (%)"]
    for task in preset["tasks"]:
        metric = primary.get(task, "?")
        arrow = "" if task not in hib else (" ↑" if hib[task].get(metric) else " ↓")
        header.append(f"{task} {metric}{arrow}")
    header += ["s / batch", "× GD", "groups", "groups after warm-up", "group-count changes", "affinity fluctuation"]
    rows = []
    for label in labels:
        row = preset["rows"].get(label)
        if row is None:
            continue
        if not row.get("primary"):
            reason = "; ".join(f"seed {f['seed']}: {f['error']}" for f in row.get("failed", []))
            rows.append([label, "0", f"failed ({reason})" if reason else "not run", *["–"] * (len(header) - 3)])
            continue
        seeds = str(len(row["seeds"])) + (f" ({len(row['failed'])} failed)" if row.get("failed") else "")
        cells = [
            label,
            seeds,
            _pm(row.get("delta_m"), row.get("delta_m_std")),
            _pm(row.get("vs_gd"), row.get("vs_gd_std")),
            _pm(row.get("delta_m_all"), row.get("delta_m_all_std")),
        ]
        for task in preset["tasks"]:
            mean, std = row["primary"][task], row["primary_std"].get(task)
            cells.append(_number(mean, 4) + ("" if std is None else f" ± {_number(std, 2)}"))
        cells += [
            _number(row.get("time_per_batch_s"), 3),
            "–" if row.get("times_gd") is None else f"{row['times_gd']:.2f}",
            "–" if row.get("groups_mean") is None else f"{row['groups_mean']:.2f}",
            *(
                "–"
                if row.get(key) is None
                else f"{row[key]:.2f}" + ("" if row.get(f"{key}_std") is None else f" ± {row[f'{key}_std']:.2f}")
                for key in ("groups_after_warmup", "group_count_changes", "affinity_fluctuation")
            ),
        ]
        rows.append(cells)
    return header, rows


def headline_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Δm and × GD per method (no ablations), one pair of columns per preset: the README's table."""
    presets = summary["presets"]
    methods: list[str] = []
    for preset in presets.values():
        methods += [
            label for label in preset["rows"] if ":" not in label and label != "single-task" and label not in methods
        ]
    header = ["method"]
    for name in presets:
        header += [f"{name} Δm (%)", f"{name} × GD"]
    rows = []
    for label in methods:
        cells = [label]
        for preset in presets.values():
            row = preset["rows"].get(label, {})
            cells.append(_pm(row.get("delta_m"), row.get("delta_m_std")) if row.get("primary") else "–")
            cells.append("–" if row.get("times_gd") is None else f"{row['times_gd']:.2f}")
        rows.append(cells)
    return header, rows


def render_markdown(summary: dict[str, Any], command: str, notes: Sequence[str]) -> str:
    machine = summary.get("machine") or {}
    versions = summary.get("versions") or {}
    lines = [
        "# selgroup-train: single-task baselines, multi-task methods, selective ablations",
        "",
        f"* Command: `{command}`",
        f"* Date: {summary['date']}",
        f"* Machine: {json.dumps(machine, sort_keys=True)}",
        f"* Versions: {json.dumps(versions, sort_keys=True)}",
        f"* Size (every run): `{summary['size']}`",
        f"* Code: {summary.get('code', 'unknown')}",
        (
            "* Δm (%): Maninis et al. over each task's primary metric against the single-task baselines, "
            "higher is better; mean ± sample std over seeds. Δm − GD's: each seed's Δm minus GD's Δm at the same seed "
            "(same initial weights, data order and validation scenes), mean ± std over the seeds both have. Δm all: over every metric (LibMTL's convention). "
            "Metric columns: mean ± std over seeds (↑ higher is better, ↓ lower). s / batch: mean training-step "
            "time; × GD: its ratio to GD's on the same preset; groups: the selective method's average number of "
            "groups per batch (warm-up included: K groups a batch); after warm-up: the same over the batches "
            "after warm-up; group-count changes: the fraction of consecutive post-warm-up batches whose number "
            "of groups differs; affinity fluctuation: the mean absolute change of an affinity entry between "
            "snapshots (every 10 iterations) over its mean absolute value."
        ),
        *(f"* {note}" for note in notes),
        "",
        "## Headline",
        "",
        markdown_table(*headline_rows(summary)),
    ]
    for name, preset in summary["presets"].items():
        main_labels = [label for label in preset["rows"] if ":" not in label]
        lines += [f"## {name}", "", markdown_table(*preset_rows(preset, main_labels))]
        for ablation in preset["ablations"]:
            lines += [
                f"### Ablation: {ablation['title']} (`{ablation['key']}`; `selective` = `{ablation['key']}={ablation['default']}`)",
                "",
                markdown_table(*preset_rows(preset, ablation["labels"])),
            ]
        if preset["relations"]:
            rel = preset["relations"]
            lines += [
                f"### Co-grouping of the selective runs ({name})",
                "",
                (
                    "Fraction of batches in which a pair of tasks shared a group, mean over the selective seeds "
                    f"(mean over all {len(rel['ranking'])} pairs: {_number(rel['mean_pair_frequency'])})."
                ),
                "",
                "| related pair | co-grouping | per seed | rank among pairs | affinity (a→b, b→a) |",
                "|---|---|---|---|---|",
            ]
            for known in rel["known"]:
                affinity = "–" if known["affinity"] is None else ", ".join(_number(v) for v in known["affinity"])
                lines.append(
                    f"| {known['pair'][0]} – {known['pair'][1]} | {_number(known['frequency'])} | "
                    f"{', '.join(_number(v) for v in known['per_seed'])} | {known['rank']} of {known['of']} | {affinity} |"
                )
            top = ", ".join(f"{r['pair'][0]}–{r['pair'][1]} {_number(r['frequency'])}" for r in rel["ranking"][:5])
            lines += ["", f"Most often grouped: {top}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def decay_figure(plan: Plan, root: Path, preset: str) -> Path | None:
    """Figure D.6 / 4c at this scale: every affinity entry (top) and the number of groups (bottom) over
    training for each decay β of the preset's decay ablation (its first seed); None without histories."""
    ablation = next((a for a in plan.ablations.get(preset, ()) if a[1] == "decay"), None)
    if ablation is None:
        return None
    _, key, default, labels = ablation
    panels = []
    for label in ["selective", *labels]:
        run = next((r for r in plan.runs if r.preset == preset and r.variant and r.variant.label == label), None)
        history = read_json(run.folder(root) / HISTORY_NAME) if run else None
        if history and history.get("affinity"):
            variant = Variant.parse(label)
            panels.append((dict(variant.options).get(key, default), history, run.seed))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels.sort(key=lambda panel: -float(panel[0]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6), squeeze=False, sharex=True)
    for column, (value, history, seed) in enumerate(panels):
        names = history["tasks"]
        k = len(names)
        snapshots = history["affinity"]
        for s in range(k):
            for t in range(k):
                if s != t:
                    axes[0][column].plot(
                        history["affinity_steps"],
                        [snap[s * k + t] for snap in snapshots],
                        lw=0.8,
                        label=f"{names[s]} → {names[t]}",
                    )
        axes[0][column].axhline(0, color="black", lw=0.5)
        axes[0][column].set_title(f"β = {value} (seed {seed})")
        axes[1][column].plot(range(1, len(history["groups"]) + 1), history["groups"], lw=0.8)
        axes[1][column].set_xlabel("iteration")
    axes[0][0].set_ylabel("affinity A[source → target]")
    axes[1][0].set_ylabel("number of groups")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{preset}: tracked affinity and number of groups for each affinity decay β")
    fig.tight_layout()
    path = root / f"{preset}_decay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timing_summary(plan: Plan, root: Path) -> dict[str, Any]:
    """Per variant: the median time per batch over rounds and the median of each round's ratio to GD."""
    records = {(run.variant.label, run.seed): read_json(run.result_file(root)) for run in plan.runs if run.variant}
    rounds = sorted({run.seed for run in plan.runs})
    rows = []
    environment: dict[str, Any] = {}
    for label in dict.fromkeys(run.variant.label for run in plan.runs if run.variant):
        times, ratios, groups = [], [], []
        for round_ in rounds:
            record, gd = records.get((label, round_)), records.get(("gd", round_))
            if record is None or "time_per_batch_s" not in record:
                continue
            environment = environment or {key: record.get(key) for key in ("machine", "versions")}
            times.append(record["time_per_batch_s"])
            if gd is not None and "time_per_batch_s" in gd:
                ratios.append(record["time_per_batch_s"] / gd["time_per_batch_s"])
            if record.get("groups_mean") is not None:
                groups.append(record["groups_mean"])
        rows.append(
            {
                "label": label,
                "rounds": len(times),
                "time_per_batch_s": statistics.median(times) if times else None,
                "times_gd": statistics.median(ratios) if ratios else None,
                "times_gd_per_round": ratios,
                "groups_mean": statistics.fmean(groups) if groups else None,
            }
        )
    return {"rows": rows, **environment}


def render_timing(summary: dict[str, Any], command: str, notes: Sequence[str]) -> str:
    header = ["method", "rounds", "s / batch (median)", "× GD (median of rounds)", "× GD per round", "groups"]
    rows = [
        [
            row["label"],
            str(row["rounds"]),
            _number(row["time_per_batch_s"], 4),
            "–" if row["times_gd"] is None else f"{row['times_gd']:.2f}",
            ", ".join(f"{ratio:.2f}" for ratio in row["times_gd_per_round"]) or "–",
            "–" if row["groups_mean"] is None else f"{row['groups_mean']:.2f}",
        ]
        for row in summary["rows"]
    ]
    lines = [
        "# selgroup-train: time per training batch, methods interleaved",
        "",
        f"* Command: `{command}`",
        f"* Date: {summary['date']}",
        f"* Machine: {json.dumps(summary.get('machine') or {}, sort_keys=True)}",
        f"* Versions: {json.dumps(summary.get('versions') or {}, sort_keys=True)}",
        f"* Size (every run): `{summary['size']}`",
        f"* Code: {summary.get('code', 'unknown')}",
        (
            "* Every round runs each method once (one at a time, the order rotated every round, the round number "
            "as the seed); s / batch is the trainer's mean training-step time (no evaluation, no data loading); "
            "× GD is taken within each round, so that a load change between rounds cancels."
        ),
        *(f"* {note}" for note in notes),
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_table(summary: dict[str, Any], root: Path, command: str, notes: Sequence[str]) -> None:
    """``table.md``, ``table.csv`` (one line per preset and variant) and ``table.json`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.json").write_text(json.dumps({"command": command, "notes": list(notes), **summary}, indent=1) + "\n")
    (root / "table.md").write_text(render_markdown(summary, command, notes))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "preset",
            "variant",
            "seeds",
            "delta_m",
            "delta_m_std",
            "delta_m_all",
            "delta_m_all_std",
            "task",
            "metric",
            "value",
            "value_std",
            "time_per_batch_s",
            "times_gd",
            "groups_mean",
        ]
    )
    for name, preset in summary["presets"].items():
        for label, row in preset["rows"].items():
            for task in preset["tasks"]:
                if not row.get("primary"):
                    continue
                writer.writerow(
                    [
                        name,
                        label,
                        len(row["seeds"]),
                        row.get("delta_m"),
                        row.get("delta_m_std"),
                        row.get("delta_m_all"),
                        row.get("delta_m_all_std"),
                        task,
                        (preset["primary"] or {}).get(task),
                        row["primary"][task],
                        row["primary_std"].get(task),
                        row.get("time_per_batch_s"),
                        row.get("times_gd"),
                        row.get("groups_mean"),
                    ]
                )
    (root / "table.csv").write_text(buffer.getvalue())


# --------------------------------------------------------------------------- command line


def code_version() -> str:
    """The checkout's commit (with ``-dirty`` when tracked files differ from it), or ``unknown``."""
    try:
        describe = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return describe.stdout.strip()


def runs_code(plan: Plan, root: Path) -> str:
    """The commits the plan's finished runs were made with (from their command.json), or this checkout's."""
    codes = {
        (read_json(run.folder(root) / COMMAND_NAME) or {}).get("code") for run in plan.runs if is_complete(run, root)
    }
    codes.discard(None)
    return ", ".join(sorted(codes)) if codes else code_version()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--plan", choices=["issue12"], help="a whole predefined sweep (ignores --presets/--methods/--seeds)"
    )
    parser.add_argument("--presets", default="nyud", help="comma-separated task presets (default nyud)")
    parser.add_argument(
        "--methods", default="gd,selective", help="comma-separated method variants NAME[:KEY=VALUE,...]"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of every method (default 0)")
    parser.add_argument(
        "--out", required=True, type=Path, help="the sweep's folder (one sub-folder per run, the tables)"
    )
    parser.add_argument("--dataset", default="scenes")
    # The CPU sweep's size (benchmarks/results/train_sweep/README.md says why): timm's 6-block, 64-wide
    # test ViT at 32 px with 8 px patches; Adam, lr 1e-3, poly decay (the trainer's CPU settings); 400 iterations.
    parser.add_argument("--backbone", default="test_vit")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N iterations (default: --iters, i.e. at the end)"
    )
    parser.add_argument(
        "--train-arg", action="append", default=[], help="one more selgroup-train argument for every run (repeatable)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="time the methods instead: ROUNDS interleaved rounds on the first preset, one run at a time",
    )
    parser.add_argument(
        "--baselines-only", action="store_true", help="run only the plan's single-task baselines (then the table)"
    )
    parser.add_argument(
        "--scenes-cache",
        type=Path,
        help="render each scene once into this folder and read it back in every run (SELGROUP_SCENES_CACHE)",
    )
    parser.add_argument(
        "--prerender",
        action="store_true",
        help="render the scenes the plan's method runs share into --scenes-cache first (--jobs at a time)",
    )
    parser.add_argument("--table-only", action="store_true", help="write the table from the finished runs; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished runs; run nothing")
    parser.add_argument("--note", action="append", default=[], help="a line for the table's header (repeatable)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
    args = parse_args(argv)
    try:
        if args.plan == "issue12":
            plan = issue12_plan()
        else:
            presets = [p.strip() for p in args.presets.split(",") if p.strip()]
            for preset in presets:
                if preset not in PRESETS:
                    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            variants = [Variant.parse(text) for text in re.split(r",(?![A-Za-z_]\w*=)", args.methods) if text.strip()]
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            if not presets or not variants or not seeds:
                raise ValueError("--presets, --methods and --seeds each need at least one entry")
            if args.timing:
                plan = timing_plan(presets[0], variants, args.timing)
            else:
                plan = custom_plan(presets, variants, seeds)
        if args.prerender and not args.scenes_cache:
            raise ValueError("--prerender needs --scenes-cache DIR")
        if args.timing and (args.plan or args.jobs != 1):
            raise ValueError("--timing runs one method at a time over --presets/--methods: no --plan, no --jobs")
        if args.timing < 0:
            raise ValueError(f"--timing must be a positive number of rounds, got {args.timing}")
        for variant in dict.fromkeys(run.variant for run in plan.runs if run.variant):
            check_variant(variant)
        for name, value in (("--iters", args.iters), ("--jobs", args.jobs), ("--img-size", args.img_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        size = Size(
            backbone=args.backbone,
            img_size=args.img_size,
            patch_size=args.patch_size,
            batch_size=args.batch_size,
            iters=args.iters,
            lr=args.lr,
            eval_every=args.eval_every or args.iters,
            dataset=args.dataset,
            extra=tuple(args.train_arg),
        )
        check_resumable(plan, args.out, size)
    except ValueError as error:
        _fail(str(error))
    command = shlex.join(["python", "benchmarks/train_table.py", *(sys.argv[1:] if argv is None else argv)])
    if args.dry_run:
        for run in plan.runs:
            if not is_complete(run, args.out):
                print(shlex.join(["selgroup-train", *run.arguments(args.out, size)]))
        return 0
    if args.scenes_cache:
        os.environ["SELGROUP_SCENES_CACHE"] = str(args.scenes_cache.resolve())
    if args.prerender and not args.table_only:
        prerender(plan, size, args.scenes_cache, args.jobs, lambda line: print(line, flush=True))
    to_run = Plan(tuple(run for run in plan.runs if run.is_baseline or not args.baselines_only), plan.ablations)
    try:
        outcomes = (
            []
            if args.table_only
            else execute(to_run, args.out, size, jobs=args.jobs, threads=args.threads, runner=runner)
        )
    except ValueError as error:
        _fail(str(error))
    summary = timing_summary(plan, args.out) if args.timing else summarize(plan, args.out)
    summary["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["size"] = shlex.join(size.flags())
    summary["code"] = runs_code(plan, args.out)
    if args.timing:
        markdown = render_timing(summary, command, args.note)
        (args.out / "timing.json").write_text(
            json.dumps({"command": command, "notes": args.note, **summary}, indent=1) + "\n"
        )
        (args.out / "timing.md").write_text(markdown)
    else:
        write_table(summary, args.out, command, args.note)
        for preset in summary["presets"]:
            decay_figure(plan, args.out, preset)
        markdown = (args.out / "table.md").read_text()
    print(markdown)
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        print(f"{len(failed)} runs failed (see their {LOG_NAME})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
