"""The training loop behind ``selgroup-train``: :func:`fit` and :func:`fit_baseline`.

One iteration is one batch: the method's ``step(closure)`` (the selective update runs one
forward, backward and optimizer step per task group; the baselines their own recipes), then
one LR-scheduler step. Evaluations, checkpoints and logging happen between iterations; the
trainer's own cost per iteration (data, logging, bookkeeping) is measured and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import methods
from ..cli_common import environment, resolve_device
from ..models import MultiTaskViT
from ..tasks import PRESETS, TASKS, Task, TaskSpec, task_losses
from . import checkpoint
from .config import ON_NONFINITE, TrainConfig, TrainError, resolve, unknown_option
from .report import TensorBoardLog, append_jsonl, summary_table, write_json, write_plots

#: ``loss_fn(outputs, targets, tasks) -> K scalar losses`` (outputs and targets in task order).
LossFn = Callable[..., Sequence[torch.Tensor]]

#: The most memory the validation batches may take to be kept between evaluations.
VAL_CACHE_BYTES = 512 * 2**20


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


# ---------------------------------------------------------------------------- setup helpers


@dataclasses.dataclass
class _Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed_from_env() -> _Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    return _Distributed(world_size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))


def task_specs(config: TrainConfig, tasks: Sequence[TaskSpec] | None) -> list[TaskSpec]:
    """The run's tasks: the user's specs, else ``--tasks`` checked against the dataset.

    ``--tasks`` is a preset, ``PRESET:NAME,...`` (some of a preset's tasks) or ``NAME,...`` (the
    tasks of the preset named like the dataset; a name it lacks, of the first preset that has it).
    A dataset's label-kind task must not have more classes than its head.
    """
    if tasks is not None:
        specs = list(tasks)
        if not specs or not all(isinstance(spec, TaskSpec) for spec in specs):
            raise TrainError("tasks= must be a non-empty list of selgroup_fast.tasks.TaskSpec")
        return specs
    from ..data import DATASETS, dataset_classes, dataset_tasks

    if config.dataset not in DATASETS:
        raise TrainError(f"--dataset: unknown dataset {config.dataset!r}; available: {', '.join(DATASETS)}")
    named = _named_tasks(config.tasks, config.dataset)
    provided = dataset_tasks(config.dataset)
    missing = [task.name for task in named if task.name not in provided]
    if missing:
        raise TrainError(
            f"--tasks: dataset {config.dataset!r} has no task {missing[0]!r}; it provides: {', '.join(provided)}"
        )
    declared = dataset_classes(config.dataset)
    for task in named:
        classes = declared.get(task.name, 0)
        if classes > task.channels:
            raise TrainError(
                f"--tasks {config.tasks}: dataset {config.dataset!r} labels task {task.name!r} with {classes} "
                f"classes but its head has {task.channels}"
            )
    return list(named)


def _named_tasks(text: str, dataset: str) -> list[Task]:
    """The tasks ``--tasks`` names (see :func:`task_specs`)."""
    key = text.strip()
    if key in PRESETS:
        return list(PRESETS[key])
    preset, qualified, names_text = key.rpartition(":")
    if qualified:
        if preset not in PRESETS:
            raise TrainError(f"--tasks {text}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        choices = {task.name: task for task in PRESETS[preset]}
        where = f"preset {preset!r}"
    else:
        choices = {**TASKS, **{task.name: task for task in PRESETS.get(dataset, ())}}
        where = "known tasks"
    names = [name.strip() for name in names_text.split(",") if name.strip()]
    if not names:
        raise TrainError(f"--tasks: expected a preset ({', '.join(PRESETS)}) or task names, got {text!r}")
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise TrainError(
            f"--tasks: unknown task {unknown[0]!r}; {where}: {', '.join(choices)} (or a preset: {', '.join(PRESETS)})"
        )
    if len(set(names)) != len(names):
        raise TrainError(f"--tasks: a task is named twice in {text!r}")
    return [choices[name] for name in names]


def _single_task(tasks: str, name: str) -> str:
    """``--tasks`` of the single-task run of ``name`` out of ``tasks``: the same preset's task."""
    key = tasks.strip()
    preset = key if key in PRESETS else key.rpartition(":")[0]
    return f"{preset}:{name}" if preset else name


def _check_labels(specs: list[TaskSpec], targets: list[torch.Tensor]) -> None:
    """Refuses, in one line, a label-kind target with a label that its task's head has no class for."""
    for spec, target in zip(specs, targets, strict=True):
        label = spec.label_outside_head(target)
        if label is not None:
            raise TrainError(
                f"task {spec.name!r}: label {label} is outside the head's {spec.channels} classes "
                f"(0..{spec.channels - 1}, or {spec.ignore_label} = ignore)"
            )


#: The seed of the built-in ``scenes`` dataset's content (fixed: see :func:`fit`).
DATASET_SEED = 0


def _check_method(config: TrainConfig) -> None:
    available = methods.available()
    if config.method not in available:
        raise TrainError(f"--method: unknown method {config.method!r}; available: {', '.join(available)}")


def _build_model(config: TrainConfig, specs: list[TaskSpec]) -> torch.nn.Module:
    import timm

    backbone = config.backbone
    assert backbone is not None and config.img_size is not None and config.patch_size is not None
    if not timm.is_model(backbone):
        raise TrainError(f"--backbone: {backbone!r} is not a timm model name (e.g. vit_tiny_patch16_224)")
    try:
        return MultiTaskViT(specs, backbone, config.img_size, config.patch_size)
    except (TypeError, ValueError) as error:
        raise TrainError(f"--backbone {backbone}: not a plain timm ViT ({str(error).splitlines()[0]})") from None


def _build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    assert config.lr is not None and config.weight_decay is not None
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # foreach, not fused: the selective update steps subsets of the parameters (see selective.py).
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, foreach=True)


def _build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    iters = config.iters
    assert iters is not None
    if config.schedule == "poly":
        # The paper's polynomial decay (power 0.9, as in its public code's PolynomialLR use).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, iters) / iters) ** 0.9)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)


def _build_method(
    config: TrainConfig, optimizer: torch.optim.Optimizer, model: torch.nn.Module, num_tasks: int, scaler: Any
) -> methods.MultiTaskMethod:
    options = dict(config.method_options)
    if config.method == "selective":
        options.setdefault("generator", torch.Generator().manual_seed(config.seed))
        if scaler is not None:
            options["grad_scaler"] = scaler
    shared_parameters = getattr(model, "shared_parameters", None)
    shared = shared_parameters() if callable(shared_parameters) else None
    # Each task's own parameters, where the model says them: a compiled model's graph hides them
    # (docs/scaling.md).
    task_parameters = getattr(model, "task_parameters", None)
    if callable(task_parameters):
        options.setdefault("task_params", task_parameters())
    options.setdefault("nonfinite", ON_NONFINITE[config.on_nonfinite])
    try:
        method = methods.create(config.method, optimizer, num_tasks, shared_params=shared, **options)
    except TypeError as error:
        option = unknown_option(error)
        if option is not None:
            raise TrainError(f"--method-option: method {config.method!r} has no option {option!r}") from None
        raise TrainError(f"--method {config.method}: {error}") from None
    except ValueError as error:
        raise TrainError(f"--method {config.method}: {error}") from None
    # A loss weighting's own warm-up (STCH's, before its nadir point is known) that outlasts the run.
    warmup_steps = getattr(method, "warmup_steps", 0)
    if config.iters is not None and warmup_steps >= config.iters:
        raise TrainError(
            f"--method {config.method}: its warm-up ({warmup_steps} steps) is not shorter than the run "
            f"(--iters {config.iters}); lower warmup= or window="
        )
    return method


def _load_baseline(path: str, specs: list[TaskSpec]) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except OSError as error:
        raise TrainError(f"--baseline {path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise TrainError(f"--baseline {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(record, dict) or not all(key in record for key in ("metrics", "higher_is_better", "primary")):
        raise TrainError(f"--baseline {path}: not a baseline.json (needs metrics, higher_is_better, primary)")
    missing = [spec.name for spec in specs if spec.name not in record["metrics"]]
    if missing:
        raise TrainError(
            f"--baseline {path} is for other tasks ({', '.join(record['metrics'])}); it has no {missing[0]!r}"
        )
    return record


class _LossMetric:
    """For tasks without a metric in selgroup_fast.metrics (a user's own task): the mean validation loss."""

    primary = "loss"
    higher_is_better: ClassVar[dict[str, bool]] = {"loss": False}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def add_loss(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pass  # fed through add_loss

    def compute(self) -> dict[str, float]:
        return {"loss": self.total / max(self.count, 1)}


def _make_metric(spec: TaskSpec) -> Any:
    """The task's metric; a user's spec named like a benchmark task gets that task's metric."""
    if isinstance(spec, Task):
        return spec.new_metric()
    return TASKS[spec.name].new_metric() if spec.name in TASKS else _LossMetric()


def _computed(task: str, metric: Any) -> dict[str, float]:
    """The metric's values; NaN for its primary metric when the evaluation had nothing to score."""
    try:
        return {key: float(value) for key, value in metric.compute().items()}
    except ValueError as error:  # e.g. no valid pixel in the evaluated batches
        print(f"warning: task {task}: {error}", file=sys.stderr)
        return {metric.primary: float("nan")}


def _as_list(targets: Any, specs: list[TaskSpec]) -> list[torch.Tensor]:
    if isinstance(targets, dict):
        return [targets[spec.name] for spec in specs]
    return list(targets)


# ---------------------------------------------------------------------------- the run


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
    env = _distributed_from_env()
    device = resolve_device(config.device)
    if env.active and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    if (train_data is None) != (val_data is None):
        raise TrainError("fit() needs both train_data= and val_data=, or neither")
    if train_data is not None and config.workers is None:
        config = dataclasses.replace(config, workers=0)  # a user's data: no worker process unless asked
    config, defaults_note = resolve(config, device)
    _share_cores_with_workers(config, device)
    custom = model is not None or tasks is not None
    if model is not None and tasks is None:
        raise TrainError("fit(model=...) needs tasks= (the TaskSpec of each of the model's outputs)")
    specs = task_specs(config, tasks)
    _check_method(config)
    baseline = _load_baseline(config.baseline, specs) if config.baseline else None
    out = Path(config.out)
    ckpt_path = out / checkpoint.FILENAME
    resume_path = _resume_path(config, ckpt_path)

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
        model = _build_model(config, specs)

    if env.active and not dist.is_initialized():
        # Initialised once per process and kept (for the next fit() of `baseline`, say): re-creating
        # the default group over torchrun's store can hang. The CLI destroys it before exiting.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return _Run(
        config,
        defaults_note,
        env,
        device,
        specs,
        model,
        train_data,
        val_data,
        loss_fn,
        baseline,
        custom,
        out,
        ckpt_path,
        resume_path,
    ).train()


def _share_cores_with_workers(config: TrainConfig, device: torch.device) -> None:
    """On the CPU, leaves one core per DataLoader worker: torch's threads spin-wait, and sharing the
    cores with a rendering worker made the default run 10× slower on 2 cores. OMP_NUM_THREADS wins."""
    if device.type != "cpu" or not config.workers or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - config.workers)))


def _resume_path(config: TrainConfig, ckpt_path: Path) -> Path | None:
    """Where to resume from: ``--resume FILE``; ``--resume auto`` = the run's own checkpoint if any."""
    if config.resume is None:
        if ckpt_path.exists():
            raise TrainError(
                f"--out {config.out} already holds a checkpoint: pass --resume to continue that run, "
                "or choose another --out"
            )
        return None
    if config.resume == "auto":
        return ckpt_path if ckpt_path.exists() else None
    path = Path(config.resume)
    if not path.is_file():
        raise TrainError(f"--resume {config.resume}: no such checkpoint file")
    return path


class _Run:
    """One training run's state; :meth:`train` runs it to the end (or to a signal)."""

    def __init__(
        self,
        config: TrainConfig,
        defaults_note: str | None,
        env: _Distributed,
        device: torch.device,
        specs: list[TaskSpec],
        model: torch.nn.Module,
        train_data: Any,
        val_data: Any,
        loss_fn: LossFn | None,
        baseline: dict[str, Any] | None,
        custom: bool,
        out: Path,
        ckpt_path: Path,
        resume_path: Path | None,
    ) -> None:
        self.config, self.defaults_note, self.env, self.device = config, defaults_note, env, device
        self.specs, self.names = specs, [spec.name for spec in specs]
        self.loss_fn: LossFn = loss_fn or task_losses
        self.baseline, self.custom, self.out, self.ckpt_path, self.resume_path = (
            baseline,
            custom,
            out,
            ckpt_path,
            resume_path,
        )
        self.raw_model = model.to(device)
        self.optimizer = _build_optimizer(config, self.raw_model)
        self.schedule = _build_schedule(config, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        self.model: torch.nn.Module = self.raw_model
        if env.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.raw_model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # the selective update back-propagates one group's losses: other heads get no gradient
                find_unused_parameters=config.method == "selective",
            )
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        # Any: the selective method's groups, affinity and warm-up are read where it is the method
        self.method: Any = _build_method(config, self.optimizer, self.raw_model, len(specs), self.scaler)
        self.selective = config.method == "selective"
        self.train_loader, self.sampler = self._train_loader(train_data)
        self.val_loader = (
            val_data
            if isinstance(val_data, DataLoader)
            else DataLoader(val_data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers or 0)
        )
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)
            if config.amp != "off"
            else contextlib.nullcontext()
        )
        k = len(specs)
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: dict[str, Any] = {
            "groups": [],  # the number of groups of every batch (selective)
            "cogrouped": [[0] * k for _ in range(k)],  # batches after warm-up in which s and t shared a group
            "cogrouping_batches": 0,
            "affinity_steps": [],
            "affinity": [],  # flattened K×K snapshots every log_every iterations
            "evaluations": [],
            "skipped_steps": 0,  # optimizer steps skipped for a non-finite loss (--on-nonfinite skip), as last read
        }
        self.times = {"data": 0.0, "step": 0.0, "bookkeeping": 0.0, "eval": 0.0, "checkpoint": 0.0}
        self.timed_iterations = 0
        self.val_cache: list[Any] | None = None
        self.phase_sums: dict[str, float] = {}
        self.phase_count = 0
        self.skipped_base = 0  # skipped steps before this process's method was built (a resumed run)

    # ------------------------------------------------------------------ data

    def _train_loader(self, data: Any) -> tuple[DataLoader, _ResumableSampler | None]:
        if isinstance(data, DataLoader):
            return data, None
        config = self.config
        sampler = _ResumableSampler(data, self.env.world_size, self.env.rank, config.seed)
        if sampler.num_samples < config.batch_size:
            raise TrainError(
                f"the training set has {len(data)} items: too few for --batch-size {config.batch_size}"
                + (f" on each of {self.env.world_size} processes" if self.env.active else "")
            )
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=config.workers or 0,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(config.seed),
        )
        return loader, sampler

    def _batches(self) -> Any:
        """Endless batches from the current data position (epoch, batch within the epoch)."""
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.skip = self.batch_in_epoch * self.config.batch_size
                iterator = iter(self.train_loader)
            else:
                iterator = iter(self.train_loader)
                for _ in range(self.batch_in_epoch):  # a user's DataLoader: replay up to the position
                    next(iterator)
            yield from iterator
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        config = self.config
        main = self.env.main
        if self.resume_path is not None:
            self._restore(checkpoint.load(self.resume_path, self._identity()))
        elif main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in ("metrics.jsonl", "results.json"):
                (self.out / stale).unlink(missing_ok=True)
        if main:
            self._announce()
        log = TensorBoardLog(self.out / "tensorboard", self.iteration) if main else None
        progress = self._progress_bar() if main else None
        started = time.perf_counter()
        batches = self._batches()
        iters, eval_every, checkpoint_every = config.iters, config.eval_every, config.checkpoint_every
        assert iters is not None and eval_every is not None and checkpoint_every is not None
        try:
            with _StopFlag() as stop:
                while self.iteration < iters:
                    t0 = time.perf_counter()
                    images, targets = next(batches)
                    self.batch_in_epoch += 1
                    images = images.to(self.device, non_blocking=True)
                    targets = self._checked_targets(targets)
                    t1 = time.perf_counter()
                    groups = self.method.groups if self.selective else None
                    log_now = (self.iteration + 1) % config.log_every == 0 or self.iteration + 1 == iters
                    self.method.profile = log_now
                    losses = self._step(images, targets)
                    t2 = time.perf_counter()
                    self.iteration += 1
                    self._bookkeeping(groups, losses, log_now, log, progress)
                    t3 = time.perf_counter()
                    self.times["data"] += t1 - t0
                    self.times["step"] += t2 - t1
                    self.times["bookkeeping"] += t3 - t2
                    self.timed_iterations += 1
                    if self.iteration % eval_every == 0 or self.iteration == iters:
                        self._evaluate(log)
                    if self.iteration % checkpoint_every == 0 or self.iteration == iters:
                        self._checkpoint()
                    if self._stop_requested(stop):
                        self._checkpoint()
                        raise Interrupted(stop.signum, self.iteration, self.ckpt_path)
        finally:
            if progress is not None:
                progress.close()
            if log is not None:
                log.close()
        if not self.history["evaluations"] or self.history["evaluations"][-1]["iteration"] != self.iteration:
            self._evaluate(None)  # a resumed run that was already complete
        results = self._results(time.perf_counter() - started)
        if main:
            write_json(self.out / "results.json", results)
            if self.selective:
                write_plots(
                    self.out, self.names, self.history, np.array(results["affinity"]), np.array(results["cogrouping"])
                )
            if config.progress:
                print(summary_table(results), end="", file=sys.stderr)
        return results

    def _checked_targets(self, targets: Any) -> list[torch.Tensor]:
        """A batch's targets in task order on the device, their labels checked against the heads first
        (on the loader's CPU tensors: no device synchronisation; a CUDA device-side assert otherwise)."""
        listed = _as_list(targets, self.specs)
        _check_labels(self.specs, listed)
        return [t.to(self.device, non_blocking=True) for t in listed]

    def _stop_requested(self, stop: _StopFlag) -> bool:
        if not self.env.active:
            return bool(stop.signum)
        # every rank must stop at the same iteration, or one would wait forever in a collective
        flag = torch.tensor([stop.signum], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item())
        return bool(stop.signum)

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _step(self, images: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """One method step and one scheduler step; a non-finite loss is the method's ``nonfinite=`` (--on-nonfinite)."""

        def closure() -> list[torch.Tensor]:
            with self.autocast:
                outputs = self.forward_model(images)
                return list(self.loss_fn(outputs, targets, self.specs))

        try:
            losses = self.method.step(closure)
        except methods.NonFiniteLoss as error:  # --on-nonfinite stop: every rank raises at the same step
            self.optimizer.zero_grad(set_to_none=True)
            if self.env.main:
                self._checkpoint()
            raise NonFiniteLoss(self.names[error.task], self.iteration + 1, error.value) from error
        self.schedule.step()
        return losses

    def _report_skipped(self, scalars: dict[str, float]) -> None:
        """Reads the method's count of skipped steps (at a log point: one host sync) and warns of new ones."""
        total = self.skipped_base + int(self.method.skipped_steps)
        new = total - self.history["skipped_steps"]
        if new and self.env.main:
            print(
                f"warning: {new} step(s) skipped for a non-finite loss by iteration {self.iteration} "
                "(--on-nonfinite skip)",
                file=sys.stderr,
            )
        self.history["skipped_steps"] = total
        scalars["train/skipped_steps"] = total

    def _bookkeeping(
        self,
        groups: list[list[int]] | None,
        losses: torch.Tensor,
        log_now: bool,
        log: TensorBoardLog | None,
        progress: Any,
    ) -> None:
        if groups is not None:
            self.history["groups"].append(len(groups))
            # Co-grouping counts the groups the strategy chose, not the affinity grouping's warm-up singletons.
            if self.method.batches > getattr(self.method.grouping, "warmup_steps", 0):
                cogrouped = self.history["cogrouped"]
                for group in groups:
                    for s in group:
                        for t in group:
                            cogrouped[s][t] += 1
                self.history["cogrouping_batches"] += 1
        if progress is not None:
            progress.update(1)
        if not log_now:
            return
        values = losses.float().tolist()
        scalars = {f"train/loss/{name}": value for name, value in zip(self.names, values, strict=False)}
        self._report_skipped(scalars)
        scalars["train/lr"] = self.optimizer.param_groups[0]["lr"]
        for phase, seconds in self.method.timings.items():
            scalars[f"time/{phase}_s"] = seconds
            self.phase_sums[phase] = self.phase_sums.get(phase, 0.0) + seconds
        self.phase_count += 1
        if groups is not None:
            scalars["selective/groups"] = len(groups)
            affinity = self.method.affinity.float().cpu()
            self.history["affinity_steps"].append(self.iteration)
            self.history["affinity"].append(affinity.flatten().tolist())
            for s, source in enumerate(self.names):
                for t, target in enumerate(self.names):
                    scalars[f"affinity/{source}->{target}"] = float(affinity[s, t])
        if log is not None:
            log.scalars(scalars, self.iteration)
        if progress is not None:
            postfix = {"loss": f"{sum(values):.3f}"}
            if groups is not None:
                postfix["groups"] = "|".join("".join(str(k) for k in group) for group in groups)
            progress.set_postfix(postfix, refresh=False)

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.config.iters,
            initial=self.iteration,
            disable=not self.config.progress,
            unit="it",
            dynamic_ncols=True,
            desc=self.config.method,
        )

    def _announce(self) -> None:
        config = self.config
        line = (
            f"selgroup-train: {config.method} on {config.dataset if not self.custom else 'your data'} "
            f"({', '.join(self.names)}), {config.backbone} at {config.img_size} px / patch {config.patch_size}, "
            f"batch {config.batch_size}"
            + (f" × {self.env.world_size} processes" if self.env.active else "")
            + f", {config.iters} iterations, {config.optimizer} lr {config.lr:g} ({config.schedule}) on {self.device}"
        )
        if self.resume_path is not None:
            line += f"; resumed at iteration {self.iteration} from {self.resume_path}"
        if config.progress:
            print(line, file=sys.stderr)
            if self.defaults_note:
                print(f"({self.defaults_note})", file=sys.stderr)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, log: TensorBoardLog | None) -> None:
        started = time.perf_counter()
        if self.env.main:
            metrics, val_losses = self._validation_metrics()
            record = {"iteration": self.iteration, "metrics": metrics, "val_loss": val_losses}
            self.history["evaluations"].append(record)
            append_jsonl(self.out / "metrics.jsonl", record)
            if log is not None:
                scalars = {
                    f"val/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()
                }
                scalars.update({f"val/loss/{task}": value for task, value in val_losses.items()})
                log.scalars(scalars, self.iteration)
        if self.env.active:
            self._share_evaluation()
        self.times["eval"] += time.perf_counter() - started

    def _share_evaluation(self) -> None:
        """Rank 0 evaluated alone; the others receive its record (so that every rank returns the results)."""
        box = [self.history["evaluations"][-1] if self.env.main else None]
        dist.broadcast_object_list(box, src=0)
        if not self.env.main:
            self.history["evaluations"].append(box[0])

    def _validation_batches(self) -> Any:
        """The validation batches; kept in memory after the first evaluation when they take under
        VAL_CACHE_BYTES (the fixed validation set is then rendered or read once, not at every evaluation)."""
        if self.val_cache is not None:
            yield from self.val_cache
            return
        kept: list[Any] | None = []
        size = 0
        for batch in itertools.islice(self.val_loader, self.config.eval_batches):
            if kept is not None:
                images, targets = batch
                size += images.nbytes + sum(t.nbytes for t in _as_list(targets, self.specs))
                if size <= VAL_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.val_cache = kept

    @torch.no_grad()
    def _validation_metrics(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        net = self.raw_model
        net.eval()
        metrics = [_make_metric(spec) for spec in self.specs]
        loss_sums = [0.0] * len(self.specs)
        batches = 0
        for images, targets in self._validation_batches():
            images = images.to(self.device, non_blocking=True)
            targets = self._checked_targets(targets)
            with self.autocast:
                outputs = net(images)
                losses = self.loss_fn(outputs, targets, self.specs)
            for k, (metric, output, target, loss) in enumerate(zip(metrics, outputs, targets, losses, strict=False)):
                metric.update(output.float(), target)
                loss_value = float(loss)
                loss_sums[k] += loss_value
                if isinstance(metric, _LossMetric):
                    metric.add_loss(loss_value)
            batches += 1
        net.train()
        self.metric_info = {
            "higher_is_better": {name: dict(m.higher_is_better) for name, m in zip(self.names, metrics, strict=False)},
            "primary": {name: m.primary for name, m in zip(self.names, metrics, strict=False)},
        }
        computed = {name: _computed(name, m) for name, m in zip(self.names, metrics, strict=False)}
        return computed, {name: total / max(batches, 1) for name, total in zip(self.names, loss_sums, strict=False)}

    # ------------------------------------------------------------------ checkpoints

    def _identity(self) -> dict[str, Any]:
        return checkpoint.identity_of(self.config.to_dict(), self.env.world_size)

    def _checkpoint(self) -> None:
        if not self.env.main:
            return
        started = time.perf_counter()
        checkpoint.save(
            self.ckpt_path,
            {
                "identity": self._identity(),
                "world_size": self.env.world_size,
                "iteration": self.iteration,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "method": self.method.state_dict(),
                "rng": checkpoint.rng_states(),
                "history": json.dumps(self.history),  # plain text: loads with weights_only=True
                "times": dict(self.times),
                "timed_iterations": self.timed_iterations,
            },
        )
        self.times["checkpoint"] += time.perf_counter() - started

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state["method"])
            checkpoint.set_rng_states(state["rng"])
            self.iteration = int(state["iteration"])
            self.epoch = int(state["epoch"])
            self.batch_in_epoch = int(state["batch_in_epoch"])
            self.history = json.loads(state["history"])
            self.skipped_base = int(self.history.setdefault("skipped_steps", 0))  # the method counts from 0 again
            self.times = dict(state["times"])
            self.timed_iterations = int(state["timed_iterations"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise checkpoint.CheckpointError(
                f"checkpoint {self.resume_path} does not fit this run ({first_line})"
            ) from None
        if self.iteration > (self.config.iters or 0):
            raise TrainError(
                f"checkpoint {self.resume_path} is at iteration {self.iteration}, past --iters {self.config.iters}"
            )

    # ------------------------------------------------------------------ results

    def _results(self, wall_time: float) -> dict[str, Any]:
        config = self.config
        final = self.history["evaluations"][-1]
        if not hasattr(self, "metric_info"):  # only rank 0 evaluates: the others rebuild the directions
            metrics = [_make_metric(spec) for spec in self.specs]
            self.metric_info = {
                "higher_is_better": {
                    name: dict(m.higher_is_better) for name, m in zip(self.names, metrics, strict=False)
                },
                "primary": {name: m.primary for name, m in zip(self.names, metrics, strict=False)},
            }
        timed = max(self.timed_iterations, 1)
        step_s = self.times["step"] / timed
        own_s = (self.times["data"] + self.times["bookkeeping"]) / timed
        results: dict[str, Any] = {
            "method": config.method,
            "dataset": config.dataset if not self.custom else "custom",
            "tasks": self.names,
            "iterations": self.iteration,
            "metrics": final["metrics"],
            "higher_is_better": self.metric_info["higher_is_better"],
            "primary": self.metric_info["primary"],
            "val_loss": final["val_loss"],
            "time_per_batch_s": step_s,
            "wall_time_s": wall_time,
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
            "skipped_steps": self.history["skipped_steps"],
            "world_size": self.env.world_size,
            "config": config.to_dict(),
            "defaults_note": self.defaults_note,
            **environment(self.device),
        }
        if self.baseline is not None:
            from ..metrics import delta_m, delta_m_all

            base = {task: self.baseline["metrics"][task] for task in self.names}
            results["baseline"] = config.baseline
            results["baseline_metrics"] = base
            try:
                results["delta_m"] = delta_m(final["metrics"], base, results["higher_is_better"], results["primary"])
                results["delta_m_all"] = delta_m_all(final["metrics"], base, results["higher_is_better"])
            except ValueError as error:  # e.g. a baseline metric of 0: no relative change
                results["delta_m"] = results["delta_m_all"] = None
                results["delta_m_error"] = str(error)
        if self.selective:
            counts = self.history["groups"]
            batches = max(self.history["cogrouping_batches"], 1)
            results["groups_mean"] = sum(counts) / max(len(counts), 1)
            results["cogrouping"] = [[c / batches for c in row] for row in self.history["cogrouped"]]
            results["cogrouping_batches"] = self.history["cogrouping_batches"]
            results["affinity"] = self.method.affinity.float().cpu().tolist()
            results["groups_final"] = self.method.groups
            if self.env.main:
                results["plots"] = ["affinity.png", "cogrouping.png", "groups.png", "affinity_entries.png"]
        if not all(math.isfinite(v) for values in final["metrics"].values() for v in values.values()):
            results["warning"] = "some metrics are not finite"
        return results


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (a shuffled shard per rank, reshuffled every epoch) that can start mid-epoch.

    ``skip`` drops the first samples of this rank's shard, so that a resumed run sees exactly the
    batches the interrupted run had not reached yet.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Any:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


# ---------------------------------------------------------------------------- baseline


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
    env = _distributed_from_env()
    out = Path(config.out)
    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        task_out = out / spec.name
        done = task_out / "results.json"
        if done.is_file():
            runs[spec.name] = json.loads(done.read_text())
            continue
        task_config = dataclasses.replace(
            config, tasks=_single_task(config.tasks, spec.name), out=str(task_out), resume="auto"
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
