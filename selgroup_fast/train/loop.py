"""The fit loop behind ``selgroup-train``: :func:`fit` and :func:`fit_baseline`.

One iteration is one batch: the method's ``step(closure)`` (the selective update runs one
forward, backward and optimizer step per task group; the baselines their own recipes), then
one LR-scheduler step. Evaluations, checkpoints and logging happen between iterations; the
trainer's own cost per iteration (data, logging, bookkeeping) is measured and reported.

The parts, each in its module: what a run is built from (:mod:`.build`), the training batches
(:mod:`.batches`), the evaluation (:mod:`.evaluation`), the history and the per-iteration
logging of what the method reports (:mod:`.summary`), the checkpoint (:mod:`.checkpoint`) and
the files a run leaves (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .. import methods
from ..cli_common import environment, resolve_device
from ..tasks import TaskSpec, task_losses
from . import checkpoint
from .batches import TrainBatches, checked_targets
from .build import (
    DATASET_SEED,
    Distributed,
    build_method,
    build_model,
    build_optimizer,
    build_schedule,
    check_method,
    distributed_from_env,
    load_baseline,
    resume_path,
    share_cores_with_workers,
    single_task,
    task_specs,
)
from .config import TrainConfig, TrainError, resolve
from .evaluation import Evaluator, LossFn, metric_directions
from .report import summary_table, write_json
from .summary import TrainingSummary


class NonFiniteLoss(RuntimeError):
    """A task loss was NaN or infinite with ``--on-nonfinite stop`` (the method raised before any backward)."""

    def __init__(self, task: str, iteration: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} for task {task!r} at iteration {iteration}")
        self.task, self.iteration, self.value = task, iteration, value


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run wrote its checkpoint and stops."""

    def __init__(self, signum: int, iteration: int, path: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at iteration {iteration}: checkpoint written to {path}; continue with --resume")
        self.signum = signum


class _StopFlag:
    """Records SIGINT/SIGTERM; the loop checks it between iterations (a signal never interrupts a step)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:  # noqa: PYI034 (typing.Self needs Python 3.11)
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def fit(
    config: TrainConfig,
    model: torch.nn.Module | None = None,
    train_data: Dataset | DataLoader | None = None,
    val_data: Dataset | DataLoader | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """Trains with ``config`` and returns the results (also written to ``config.out``/results.json).

    By default the model is selgroup-bench's :class:`MultiTaskViT` and the data the dataset
    ``config.dataset``. Plug in your own: ``model`` (``forward(images)`` returns one output per
    task, in task order; a ``shared_parameters()`` method is needed by the gradient-manipulation
    methods), ``tasks`` (its :class:`TaskSpec` list), ``train_data``/``val_data`` (a Dataset of
    ``(image, targets)`` with targets a dict by task name or a sequence in task order, or a
    ready DataLoader) and ``loss_fn(outputs, targets, tasks) -> K losses`` (default: cross-entropy
    ignoring label 255 and L1 ignoring NaN pixels). Tasks that ``selgroup_fast.metrics`` does not
    know are evaluated by their mean validation loss.
    """
    env = distributed_from_env()
    device = resolve_device(config.device)
    if env.active and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if (train_data is None) != (val_data is None):
        raise TrainError("fit() needs both train_data= and val_data=, or neither")
    if train_data is not None and config.workers is None:
        config = dataclasses.replace(config, workers=0)  # a user's data: no worker process unless asked
    config, defaults_note = resolve(config, device)
    share_cores_with_workers(config, device)
    custom = model is not None or tasks is not None
    if model is not None and tasks is None:
        raise TrainError("fit(model=...) needs tasks= (the TaskSpec of each of the model's outputs)")
    specs = task_specs(config, tasks)
    check_method(config)
    baseline = load_baseline(config.baseline, specs) if config.baseline else None
    out = Path(config.out)
    ckpt_path = out / checkpoint.FILENAME
    resume_from = resume_path(config, ckpt_path)

    if train_data is None:
        from ..data import build_dataset

        assert config.img_size is not None
        names = [spec.name for spec in specs]
        # The built-in dataset is one fixed dataset, like a real one: --seed draws the model's
        # initialisation, the data order and the methods' randomness, never other scenes (so runs of
        # any seed, and their baselines, are scored on the same validation images).
        train_data = build_dataset(config.dataset, "train", names, config.img_size, config.data_root, DATASET_SEED)
        val_data = build_dataset(config.dataset, "val", names, config.img_size, config.data_root, DATASET_SEED)
    if model is None:
        torch.manual_seed(config.seed)  # the same initial parameters on every rank and every run
        model = build_model(config, specs)

    if env.active and not dist.is_initialized():
        # Initialised once per process and kept (for the next fit() of `baseline`, say): re-creating
        # the default group over torchrun's store can hang. The CLI destroys it before exiting.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    run = _Run(config, env, device, specs, model, train_data, val_data, loss_fn or task_losses, out, resume_from)
    return run.train(defaults_note, baseline, custom)


class _Run:
    """One training run: its parts, built once; :meth:`train` runs it to the end (or to a signal)."""

    def __init__(
        self,
        config: TrainConfig,
        env: Distributed,
        device: torch.device,
        specs: list[TaskSpec],
        model: torch.nn.Module,
        train_data: Any,
        val_data: Any,
        loss_fn: LossFn,
        out: Path,
        resume_from: Path | None,
    ) -> None:
        self.config, self.env, self.device, self.specs, self.loss_fn = config, env, device, specs, loss_fn
        self.names = [spec.name for spec in specs]
        self.out, self.resume_from = out, resume_from
        self.raw_model = model.to(device)
        self.optimizer = build_optimizer(config, self.raw_model)
        self.schedule = build_schedule(config, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        self.method = build_method(config, self.optimizer, self.raw_model, len(specs), self.scaler)
        self.model: torch.nn.Module = self.raw_model
        if env.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.method.backpropagates_task_subsets,
            )
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.batches = TrainBatches(train_data, config, env.world_size, env.rank, device)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)
            if config.amp != "off"
            else contextlib.nullcontext()
        )
        val_loader = (
            val_data
            if isinstance(val_data, DataLoader)
            else DataLoader(val_data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers or 0)
        )
        self.evaluate_model = Evaluator(specs, val_loader, config.eval_batches, loss_fn, device, self.autocast)
        self.summary = TrainingSummary(self.names, out, env.main)
        self.saver = checkpoint.CheckpointSaver(
            out / checkpoint.FILENAME,
            checkpoint.identity_of(config.to_dict(), env.world_size),
            {
                "model": self.raw_model,
                "optimizer": self.optimizer,
                "schedule": self.schedule,
                "scaler": self.scaler,
                "method": self.method,
            },
        )
        self.iteration = 0

    # ------------------------------------------------------------------ the loop

    def train(self, defaults_note: str | None, baseline: dict[str, Any] | None, custom: bool) -> dict[str, Any]:
        config, main, summary = self.config, self.env.main, self.summary
        iters, eval_every, checkpoint_every = config.iters, config.eval_every, config.checkpoint_every
        assert iters is not None and eval_every is not None and checkpoint_every is not None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in ("metrics.jsonl", "results.json"):
                (self.out / stale).unlink(missing_ok=True)
        if main and config.progress:
            print(self._announcement(custom), file=sys.stderr)
            if defaults_note:
                print(f"({defaults_note})", file=sys.stderr)
        summary.open(self.iteration, iters, config.progress, config.method)
        started = time.perf_counter()
        batches = iter(self.batches)
        try:
            with _StopFlag() as stop:
                while self.iteration < iters:
                    with summary.timed("data"):
                        images, targets = next(batches)
                        images = images.to(self.device, non_blocking=True)
                        targets = checked_targets(targets, self.specs, self.device)
                    with summary.timed("step"):
                        stepped = self.method.report()  # before the step: the groups it updates
                        log_now = (self.iteration + 1) % config.log_every == 0 or self.iteration + 1 == iters
                        self.method.profile = log_now
                        losses = self._step(images, targets)
                    self.iteration += 1
                    with summary.timed("bookkeeping"):
                        summary.iteration(stepped)
                        if log_now:
                            lr = self.optimizer.param_groups[0]["lr"]
                            now = self.method.report()
                            summary.log_point(self.iteration, losses, stepped, now, lr, self.method.timings)
                    summary.timed_iterations += 1
                    if self.iteration % eval_every == 0 or self.iteration == iters:
                        self._evaluate()
                    if self.iteration % checkpoint_every == 0 or self.iteration == iters:
                        self._checkpoint()
                    if self._stop_requested(stop):
                        self._checkpoint()
                        raise Interrupted(stop.signum, self.iteration, self.saver.path)
        finally:
            summary.close()
        evaluations = summary.history["evaluations"]
        if not evaluations or evaluations[-1]["iteration"] != self.iteration:
            self._evaluate()  # a resumed run that was already complete
        results = self._results(time.perf_counter() - started, defaults_note, baseline, custom)
        if main:
            write_json(self.out / "results.json", results)
            summary.write_plots(results)
            if config.progress:
                print(summary_table(results), end="", file=sys.stderr)
        return results

    def _step(self, images: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """One method step and one scheduler step; a non-finite loss is the method's ``nonfinite=`` (--on-nonfinite)."""

        def closure_of(inputs: torch.Tensor, labels: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
            def closure() -> list[torch.Tensor]:
                with self.autocast:
                    outputs = self.forward_model(inputs)
                    return list(self.loss_fn(outputs, labels, self.specs))

            return closure

        try:
            if self.method.reads_two_batches:  # MoDo, SDMGrad: the batch's two halves
                half = images.shape[0] // 2  # >= 1: build_method refuses --batch-size 1
                first, second = (
                    closure_of(images[:half], [t[:half] for t in targets]),
                    closure_of(images[half:], [t[half:] for t in targets]),
                )
                losses = cast(Any, self.method).step(first, second)
            else:
                losses = self.method.step(closure_of(images, targets))
        except methods.NonFiniteLoss as error:  # --on-nonfinite stop: every rank raises at the same step
            self.optimizer.zero_grad(set_to_none=True)
            self._checkpoint()
            raise NonFiniteLoss(self.names[error.task], self.iteration + 1, error.value) from error
        self.schedule.step()
        return losses

    def _stop_requested(self, stop: _StopFlag) -> bool:
        if not self.env.active:
            return bool(stop.signum)
        # every rank must stop at the same iteration, or one would wait forever in a collective
        collective_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        flag = torch.tensor([stop.signum], dtype=torch.int64, device=collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item())
        return bool(stop.signum)

    def _announcement(self, custom: bool) -> str:
        config = self.config
        line = (
            f"selgroup-train: {config.method} on {config.dataset if not custom else 'your data'} "
            f"({', '.join(self.names)}), {config.backbone} at {config.img_size} px / patch {config.patch_size}, "
            f"batch {config.batch_size}"
            + (f" × {self.env.world_size} processes" if self.env.active else "")
            + f", {config.iters} iterations, {config.optimizer} lr {config.lr:g} ({config.schedule}) on {self.device}"
            + f"; data cache {self.batches.cache_note}"
        )
        if self.resume_from is not None:
            line += f"; resumed at iteration {self.iteration} from {self.resume_from}"
        return line

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate(self) -> None:
        """Rank 0 evaluates alone; the others receive its record (so that every rank returns the results)."""
        with self.summary.timed("eval"):
            record = None
            if self.env.main:
                metrics, val_losses = self.evaluate_model(self.raw_model)
                record = {"iteration": self.iteration, "metrics": metrics, "val_loss": val_losses}
            if self.env.active:
                box = [record]
                dist.broadcast_object_list(box, src=0)
                record = box[0]
            assert record is not None
            self.summary.evaluation(record)

    def _checkpoint(self) -> None:
        if not self.env.main:
            return
        with self.summary.timed("checkpoint"):
            position = {"epoch": self.batches.epoch, "batch_in_epoch": self.batches.batch_in_epoch}
            self.saver.save({"iteration": self.iteration, **position, **self.summary.state()})

    def _restore(self, source: Path) -> None:
        state = self.saver.restore(source)
        with checkpoint.fitting(source):
            self.iteration = int(state["iteration"])
            self.batches.epoch = int(state["epoch"])
            self.batches.batch_in_epoch = int(state["batch_in_epoch"])
            self.summary.load_state(state)
        if self.iteration > (self.config.iters or 0):
            raise TrainError(f"checkpoint {source} is at iteration {self.iteration}, past --iters {self.config.iters}")

    # ------------------------------------------------------------------ results

    def _results(
        self, wall_time: float, defaults_note: str | None, baseline: dict[str, Any] | None, custom: bool
    ) -> dict[str, Any]:
        config, summary = self.config, self.summary
        final = summary.history["evaluations"][-1]
        overhead = summary.overhead()
        results: dict[str, Any] = {
            "method": config.method,
            "dataset": config.dataset if not custom else "custom",
            "tasks": self.names,
            "iterations": self.iteration,
            "metrics": final["metrics"],
            **metric_directions(self.specs),
            "val_loss": final["val_loss"],
            "time_per_batch_s": overhead["time_per_batch_s"],
            "wall_time_s": wall_time,
            "overhead": overhead["overhead"],
            "phase_s_per_batch": overhead["phase_s_per_batch"],
            "data_cache": self.batches.cache_note,
            "skipped_steps": summary.history["skipped_steps"],
            "world_size": self.env.world_size,
            "config": config.to_dict(),
            "defaults_note": defaults_note,
            **environment(self.device),
        }
        if baseline is not None:
            from ..metrics import delta_m, delta_m_all

            base = {task: baseline["metrics"][task] for task in self.names}
            results["baseline"] = config.baseline
            results["baseline_metrics"] = base
            try:
                results["delta_m"] = delta_m(final["metrics"], base, results["higher_is_better"], results["primary"])
                results["delta_m_all"] = delta_m_all(final["metrics"], base, results["higher_is_better"])
            except ValueError as error:  # e.g. a baseline metric of 0: no relative change
                results["delta_m"] = results["delta_m_all"] = None
                results["delta_m_error"] = str(error)
        results.update(summary.method_results(self.method.report()))
        if not all(math.isfinite(v) for values in final["metrics"].values() for v in values.values()):
            results["warning"] = "some metrics are not finite"
        return results


def fit_baseline(config: TrainConfig) -> dict[str, Any]:
    """Trains one single-task model per task (plain GD, same model, data and schedule) -> ``out/baseline.json``.

    Each task's run lives in ``out/<task>/``; a task whose ``results.json`` is already there is not
    trained again (so an interrupted baseline continues where it stopped).
    """
    if config.baseline:
        raise TrainError("baseline: --baseline makes no sense here (this command writes the baseline)")
    if config.method != "gd" or config.method_options:
        raise TrainError("baseline: the single-task models are trained with plain GD; drop --method/--method-option")
    specs = task_specs(config, None)
    env = distributed_from_env()
    out = Path(config.out)
    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        task_out = out / spec.name
        done = task_out / "results.json"
        if done.is_file():
            runs[spec.name] = json.loads(done.read_text())
            continue
        task_config = dataclasses.replace(
            config, tasks=single_task(config.tasks, spec.name), out=str(task_out), resume="auto"
        )
        if env.main and config.progress:
            print(f"baseline: task {spec.name}", file=sys.stderr)
        runs[spec.name] = fit(task_config)
    first = next(iter(runs.values()))
    record = {
        "tasks": [spec.name for spec in specs],
        "metrics": {task: run["metrics"][task] for task, run in runs.items()},
        "higher_is_better": {task: run["higher_is_better"][task] for task, run in runs.items()},
        "primary": {task: run["primary"][task] for task, run in runs.items()},
        "config": {**first["config"], "tasks": config.tasks, "out": config.out},
        "time_per_batch_s": {task: run["time_per_batch_s"] for task, run in runs.items()},
        "versions": first["versions"],
        "machine": first["machine"],
    }
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "baseline.json", record)
    return record
