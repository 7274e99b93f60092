"""The run's history and its per-iteration summary: what the method reports, logged where it is given.

The loop hands over, every iteration, the :class:`~selgroup_fast.methods.MethodReport` taken
before the step (host values only are read: the groups the step updates) and, at log points,
the losses and the report taken after the step, whose tensors are read there (one host sync per
log point). Nothing here knows a method by name: a report's groups, affinity and weights are
logged when the method gives them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods import MethodReport
from .report import PLOTS, TensorBoardLog, append_jsonl, write_plots

#: The trainer's own timers (seconds, summed over the run): data, step and bookkeeping per iteration,
#: evaluations and checkpoints in total.
TIMERS = ("data", "step", "bookkeeping", "eval", "checkpoint")


class TrainingSummary:
    """History (checkpointed), timers, TensorBoard scalars and the progress bar of one run.

    ``history``: ``groups`` (the number of groups of every batch), ``cogrouped`` (K×K: the batches
    whose chosen groups put s and t together), ``cogrouping_batches``, ``affinity_steps`` and
    ``affinity`` (flattened K×K snapshots at log points), ``evaluations``, ``skipped_steps``.
    """

    def __init__(self, names: list[str], out: Path, main: bool) -> None:
        self.names, self.out, self.main = names, out, main
        k = len(names)
        self.history: dict[str, Any] = {
            "groups": [],
            "cogrouped": [[0] * k for _ in range(k)],
            "cogrouping_batches": 0,
            "affinity_steps": [],
            "affinity": [],
            "evaluations": [],
            "skipped_steps": 0,  # optimizer steps skipped (a non-finite loss, an fp16 overflow), as last read
        }
        self.times = dict.fromkeys(TIMERS, 0.0)
        self.timed_iterations = 0
        self.phase_sums: dict[str, float] = {}
        self.phase_count = 0
        self.skipped_base = 0  # skipped steps before this process's method was built (a resumed run)
        self._log: TensorBoardLog | None = None
        self._progress: Any = None

    # ------------------------------------------------------------------ checkpointed state

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the history as plain text: it loads with ``weights_only=True``)."""
        return {
            "history": json.dumps(self.history),
            "times": dict(self.times),
            "timed_iterations": self.timed_iterations,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.history = json.loads(state["history"])
        self.skipped_base = int(self.history.setdefault("skipped_steps", 0))  # the method counts from 0 again
        self.times = dict(state["times"])
        self.timed_iterations = int(state["timed_iterations"])

    @contextmanager
    def timed(self, timer: str) -> Iterator[None]:
        """Adds the seconds the block takes to timer ``timer``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[timer] += time.perf_counter() - started

    # ------------------------------------------------------------------ outputs of the main rank

    def open(self, iteration: int, iters: int, progress: bool, label: str) -> None:
        """Starts TensorBoard and the progress bar (the main rank only), at ``iteration`` of ``iters``."""
        if not self.main:
            return
        from tqdm import tqdm

        self._log = TensorBoardLog(self.out / "tensorboard", iteration)
        self._progress = tqdm(
            total=iters, initial=iteration, disable=not progress, unit="it", dynamic_ncols=True, desc=label
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._log is not None:
            self._log.close()
        self._progress = self._log = None

    # ------------------------------------------------------------------ every iteration

    def iteration(self, stepped: MethodReport) -> None:
        """Counts a batch: ``stepped`` is the report taken before its step (its groups are the step's)."""
        groups = stepped.groups
        if groups is not None:
            self.history["groups"].append(len(groups))
            # Co-grouping counts the groups the strategy chose, not the affinity grouping's warm-up singletons.
            if stepped.groups_chosen:
                cogrouped = self.history["cogrouped"]
                for group in groups:
                    for s in group:
                        for t in group:
                            cogrouped[s][t] += 1
                self.history["cogrouping_batches"] += 1
        if self._progress is not None:
            self._progress.update(1)

    def log_point(
        self,
        iteration: int,
        losses: torch.Tensor,
        stepped: MethodReport,
        now: MethodReport,
        lr: float,
        timings: dict[str, float],
    ) -> None:
        """Logs the step's losses, what the method reports now (``now``, read here), the LR and the phase timings."""
        values = losses.float().tolist()
        scalars = {f"train/loss/{name}": value for name, value in zip(self.names, values, strict=False)}
        scalars["train/skipped_steps"] = self._skipped(now, iteration)
        scalars["train/lr"] = lr
        for phase, seconds in timings.items():
            scalars[f"time/{phase}_s"] = seconds
            self.phase_sums[phase] = self.phase_sums.get(phase, 0.0) + seconds
        self.phase_count += 1
        if stepped.groups is not None:
            scalars["selective/groups"] = len(stepped.groups)
        if now.weights is not None:
            weights = now.weights.float().cpu().tolist()
            scalars.update({f"weights/{name}": w for name, w in zip(self.names, weights, strict=False)})
        if now.affinity is not None:
            affinity = now.affinity.float().cpu()
            self.history["affinity_steps"].append(iteration)
            self.history["affinity"].append(affinity.flatten().tolist())
            for s, source in enumerate(self.names):
                for t, target in enumerate(self.names):
                    scalars[f"affinity/{source}->{target}"] = float(affinity[s, t])
        if self._log is not None:
            self._log.scalars(scalars, iteration)
        if self._progress is not None:
            postfix = {"loss": f"{sum(values):.3f}"}
            if stepped.groups is not None:
                postfix["groups"] = "|".join("".join(str(k) for k in group) for group in stepped.groups)
            self._progress.set_postfix(postfix, refresh=False)

    def _skipped(self, now: MethodReport, iteration: int) -> int:
        """Reads the method's count of skipped steps (one host sync) and warns of new ones."""
        total = self.skipped_base + int(now.skipped_steps)
        new = total - self.history["skipped_steps"]
        if new and self.main:
            print(
                f"warning: {new} step(s) skipped for a non-finite loss (--on-nonfinite skip) or gradient "
                f"(--amp fp16's scaler) by iteration {iteration}",
                file=sys.stderr,
            )
        self.history["skipped_steps"] = total
        return total

    # ------------------------------------------------------------------ evaluations and the end

    def evaluation(self, record: dict[str, Any]) -> None:
        """Keeps an evaluation's record; the main rank writes it to metrics.jsonl and TensorBoard."""
        self.history["evaluations"].append(record)
        if not self.main:
            return
        append_jsonl(self.out / "metrics.jsonl", record)
        if self._log is not None:
            scalars = {
                f"val/{task}/{name}": value
                for task, values in record["metrics"].items()
                for name, value in values.items()
            }
            scalars.update({f"val/loss/{task}": value for task, value in record["val_loss"].items()})
            self._log.scalars(scalars, record["iteration"])

    def overhead(self) -> dict[str, Any]:
        """``time_per_batch_s``, ``overhead`` and ``phase_s_per_batch`` of results.json."""
        timed = max(self.timed_iterations, 1)
        step_s = self.times["step"] / timed
        own_s = (self.times["data"] + self.times["bookkeeping"]) / timed
        return {
            "time_per_batch_s": step_s,
            "overhead": {
                "data_s_per_iteration": self.times["data"] / timed,
                "bookkeeping_s_per_iteration": self.times["bookkeeping"] / timed,
                "step_s_per_iteration": step_s,
                "percent_of_step": 100 * own_s / step_s if step_s > 0 else 0.0,
                "eval_s_total": self.times["eval"],
                "checkpoint_s_total": self.times["checkpoint"],
            },
            "phase_s_per_batch": {phase: total / self.phase_count for phase, total in self.phase_sums.items()}
            if self.phase_count
            else {},
        }

    def method_results(self, final: MethodReport) -> dict[str, Any]:
        """What results.json says of the method's groups and affinity (``final``: its report at the end)."""
        results: dict[str, Any] = {}
        if final.groups is not None:
            counts = self.history["groups"]
            batches = max(self.history["cogrouping_batches"], 1)
            results["groups_mean"] = sum(counts) / max(len(counts), 1)
            results["cogrouping"] = [[c / batches for c in row] for row in self.history["cogrouped"]]
            results["cogrouping_batches"] = self.history["cogrouping_batches"]
        if final.affinity is not None:
            results["affinity"] = final.affinity.float().cpu().tolist()
        if final.groups is not None:
            results["groups_final"] = final.groups
            if final.affinity is not None and self.main:
                results["plots"] = list(PLOTS)
        return results

    def write_plots(self, results: dict[str, Any]) -> None:
        """The groups' and the affinity's figures, where ``results`` lists them (:meth:`method_results`)."""
        if "plots" in results:
            write_plots(
                self.out, self.names, self.history, np.array(results["affinity"]), np.array(results["cogrouping"])
            )
