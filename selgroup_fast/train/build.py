"""What a run is built from: the processes, the tasks, the model, the optimizer, the schedule, the method.

Every builder checks its part of the config and refuses it with one :class:`TrainError` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import methods
from ..models import MultiTaskViT
from ..tasks import PRESETS, TASKS, Task, TaskSpec
from .config import ON_NONFINITE, TrainConfig, TrainError, method_error

#: The seed of the built-in ``scenes`` dataset's content (fixed: see :func:`~.loop.fit`).
DATASET_SEED = 0


@dataclasses.dataclass
class Distributed:
    """This process's place among the processes torchrun started (one process without it)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    return Distributed(world_size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))


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


def single_task(tasks: str, name: str) -> str:
    """``--tasks`` of the single-task run of ``name`` out of ``tasks``: the same preset's task."""
    key = tasks.strip()
    preset = key if key in PRESETS else key.rpartition(":")[0]
    return f"{preset}:{name}" if preset else name


def check_method(config: TrainConfig) -> None:
    available = methods.available()
    if config.method not in available:
        raise TrainError(f"--method: unknown method {config.method!r}; available: {', '.join(available)}")


def build_model(config: TrainConfig, specs: list[TaskSpec]) -> torch.nn.Module:
    import timm

    backbone = config.backbone
    assert backbone is not None and config.img_size is not None and config.patch_size is not None
    if not timm.is_model(backbone):
        raise TrainError(f"--backbone: {backbone!r} is not a timm model name (e.g. vit_tiny_patch16_224)")
    try:
        return MultiTaskViT(specs, backbone, config.img_size, config.patch_size)
    except (TypeError, ValueError) as error:
        raise TrainError(f"--backbone {backbone}: not a plain timm ViT ({str(error).splitlines()[0]})") from None


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    assert config.lr is not None and config.weight_decay is not None
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # foreach, not fused: the selective update steps subsets of the parameters (see selective.py).
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, foreach=True)


def build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    iters = config.iters
    assert iters is not None
    if config.schedule == "poly":
        # The paper's polynomial decay (power 0.9, as in its public code's PolynomialLR use).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, iters) / iters) ** 0.9)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)


def build_method(
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    num_tasks: int,
    scaler: torch.amp.GradScaler | None,
) -> methods.MultiTaskMethod:
    """The method ``--method`` names, with the run's seed, grad scaler and parameters where it takes them."""
    options = dict(config.method_options)
    accepted = methods.options(config.method)
    if "generator" in accepted:
        options.setdefault("generator", torch.Generator().manual_seed(config.seed))
    if scaler is not None:  # every method takes one (selgroup_fast.methods.amp)
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
    except (TypeError, ValueError) as error:
        raise TrainError(method_error(config.method, error)) from None
    # The method's own warm-up (STCH's nadir point, GradNorm's, ExcessMTL's, the selective update's singleton
    # groups) that outlasts the run: its rule would never be in effect.
    if config.iters is not None and method.warmup_steps >= config.iters:
        raise TrainError(
            f"--method {config.method}: its warm-up ({method.warmup_steps} steps) is not shorter than the run "
            f"(--iters {config.iters}); lower {method.warmup_options} or raise --iters"
        )
    # MoDo, SDMGrad: the step splits each batch (exactly --batch-size samples per process) in two halves.
    if method.reads_two_batches and config.batch_size < 2:
        raise TrainError(
            f"--method {config.method} reads two batches per step: the trainer splits each batch in halves, which "
            f"needs --batch-size 2 or more (got {config.batch_size})"
        )
    return method


def load_baseline(path: str, specs: list[TaskSpec]) -> dict[str, Any]:
    """The ``baseline.json`` of ``--baseline``, checked to hold every task of the run."""
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


def share_cores_with_workers(config: TrainConfig, device: torch.device) -> None:
    """On the CPU, leaves one core per DataLoader worker: torch's threads spin-wait, and sharing the
    cores with a rendering worker made the default run 10× slower on 2 cores. OMP_NUM_THREADS wins."""
    if device.type != "cpu" or not config.workers or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - config.workers)))


def resume_path(config: TrainConfig, ckpt_path: Path) -> Path | None:
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
