"""Running a plan: one ``selgroup-train`` subprocess per run, each in its own folder, resumable.

A folder whose run finished (its ``results.json`` or ``baseline.json`` is complete and its
``command.json`` holds the same command) is not redone; an unfinished one (a killed sweep) is
deleted and redone; a finished one made by another command is refused. Every file the sweep
writes is written atomically (:func:`selgroup_fast.train.report.write_text`), and a run killed
between finishing and being pruned is pruned on the next pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...tasks import PRESETS
from ..report import write_text
from .plan import Plan, PlanError, Run, Size

#: The folder that holds the ``selgroup_fast`` package this sweep runs: put first on the runs'
#: ``PYTHONPATH``, so that every run imports the same code as the sweep.
SOURCE_ROOT = Path(__file__).resolve().parents[3]

#: A runner executes one command (argv) with an environment, writing its output to a log
#: file, and returns the exit status. Tests pass a fake one.
Runner = Callable[[list[str], dict[str, str], Path], int]

#: The files a finished run keeps; checkpoints and event files go (they are large and
#: only serve a resume, which a finished run no longer needs).
PRUNED_PATTERNS = ("*.pt", "*.pth", "*.ckpt", "*.ckpt.tmp", "*.tmp", "events.out.tfevents.*")
HISTORY_NAME = "history.json"
LOG_NAME = "train.log"
LOG_TAIL_LINES = 40
COMMAND_NAME = "command.json"


def _render_split(dataset: str, tasks: tuple[str, ...], img_size: int, seed: int, split: str, cache: str) -> int:
    from ...data import build_dataset

    data = build_dataset(dataset, split, tasks, img_size, seed=seed, cache_dir=cache)
    for index in range(len(data)):  # type: ignore[arg-type]
        data[index]
    return len(data)  # type: ignore[arg-type]


def splits_to_render(plan: Plan) -> list[tuple[tuple[str, ...], int, str]]:
    """(task set, seed, split) of every ``scenes`` split that the plan's method runs share, once each.

    The trainer draws the scenes from ``--seed`` and the cache is keyed by the task set: one train and
    one val split per preset and seed. The single-task baselines' splits (one task each) are read by
    one run only, so they are rendered as that run goes.

    >>> from selgroup_fast.train.sweep.plan import plan_from_data
    >>> plan = plan_from_data({"presets": {name: {"methods": [{"variants": ["gd", "selective"], "seeds": 2}]}
    ...                                    for name in ("nyud", "taskonomy")}})
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


def subprocess_runner(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Runs ``argv`` with ``env``, its stdout and stderr going to ``log``."""
    with open(log, "w") as stream:
        return subprocess.run(argv, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False).returncode


def read_json(path: Path) -> Any:
    """The JSON value in ``path`` (a run's record: an object), or None when it is missing or does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(run: Run, root: Path) -> bool:
    """Whether the run's result file exists, parses and holds metrics for every task of its preset."""
    record = read_json(run.result_file(root))
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
            raise PlanError(
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
    write_text(folder / HISTORY_NAME, json.dumps(kept) + "\n")


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
        write_text(log, "\n".join(lines[-LOG_TAIL_LINES:]) + "\n")


def finish(folder: Path) -> None:
    """What follows a run: its history kept, then its checkpoints pruned (in that order, so that a
    sweep killed in between finds the checkpoint again and finishes the folder on its next pass)."""
    keep_history(folder)
    prune(folder)


def _unpruned(folder: Path) -> bool:
    return any(path.is_file() for pattern in PRUNED_PATTERNS for path in folder.rglob(pattern))


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
            raise PlanError(f"another sweep is running on {root}") from None
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
        PYTHONPATH=os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")])),
    )
    code = code_version()
    finished = [run for run in plan.runs if is_complete(run, root)]
    done = set(finished)
    for run in finished:
        if _unpruned(run.folder(root)):  # finished, then killed before its pruning
            finish(run.folder(root))
    pending = [run for run in plan.runs if run not in done]
    outcomes = [Outcome(run, "skipped") for run in finished]
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
        write_text(folder / COMMAND_NAME, json.dumps(record, indent=1) + "\n")
        begin = time.perf_counter()
        status = runner(argv, env, folder / LOG_NAME)
        seconds = time.perf_counter() - begin
        ok = status == 0 and is_complete(run, root)
        message = "" if ok else f"exit status {status}: {last_error_line(folder)}"
        finish(folder)
        outcome = Outcome(run, "done" if ok else "failed", seconds, message)
        with lock:
            label = "baselines" if run.variant is None else f"{run.variant.label} seed {run.seed}"
            echo(f"[{run.preset}] {label}: {outcome.status} in {seconds:.0f} s {message}".rstrip())
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes += list(pool.map(one, pending))
    return outcomes


def code_version() -> str:
    """The commit of the checkout the package runs from (``-dirty`` when tracked files differ from it),
    or ``unknown`` (an installed package, no git)."""
    if not (SOURCE_ROOT / ".git").exists():  # not a checkout: git would describe an enclosing repository
        return "unknown"
    try:
        describe = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return describe.stdout.strip()


def runs_code(plan: Plan, root: Path) -> str:
    """The commits the plan's finished runs were made with (from their command.json), or this checkout's."""
    codes: set[str] = {
        code
        for run in plan.runs
        if is_complete(run, root) and (code := (read_json(run.folder(root) / COMMAND_NAME) or {}).get("code"))
    }
    return ", ".join(sorted(codes)) if codes else code_version()
