"""The trainer's settings: :class:`TrainConfig` (one field per ``selgroup-train`` flag) and its defaults.

A field left at ``None`` takes the machine's default when :func:`resolve` runs: on a CPU a small
size that trains the default run in under 3 minutes on 2 cores, on a GPU the paper's settings
(Jeong & Yoon, ICLR 2025, Table C.1: Adam, lr 2e-5, weight decay 1e-6, polynomial decay, batch 8,
224 px images, 40,000 iterations).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cli_common import MachineDefaults, UsageError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("poly", "constant")
AMP_MODES = ("off", "bf16", "fp16")
#: ``--data-cache``: the built-in scenes split rendered once into memory (see train/batches.py).
DATA_CACHE_MODES = ("auto", "on", "off")
#: ``--on-nonfinite``: the methods' ``nonfinite=`` mode each choice runs (stop: raise, then checkpoint and exit 1).
ON_NONFINITE = {"stop": "raise", "skip": "skip", "propagate": "propagate"}


class TrainError(UsageError):
    """Bad input to the trainer (a flag, a task, a file): the CLI prints it as one ``error:`` line."""


@dataclass(frozen=True)
class TrainDefaults(MachineDefaults):
    """What a run uses for the fields left at ``None``: the model's size and the training's length."""

    iters: int
    lr: float
    weight_decay: float
    checkpoint_every: int
    workers: int


CPU_DEFAULTS = TrainDefaults(
    backbone="test_vit",
    img_size=32,
    patch_size=8,
    iters=300,
    lr=1e-3,
    weight_decay=1e-6,
    checkpoint_every=100,
    workers=1,
    note="CPU defaults: timm's test_vit (a 6-block, 64-wide ViT) at 32 px (patch 8), 300 iterations, Adam lr 1e-3 "
    "(a randomly initialised encoder learns little in 300 steps at the paper's 2e-5), so that the run takes "
    "under 3 minutes on 2 cores; on a GPU the defaults are the paper's Table C.1 settings",
)
GPU_DEFAULTS = TrainDefaults(
    backbone="vit_small_patch16_224",
    img_size=224,
    patch_size=16,
    iters=40_000,
    lr=2e-5,
    weight_decay=1e-6,
    checkpoint_every=1000,
    workers=4,
    note="GPU defaults: the paper's Table C.1 settings (Adam, lr 2e-5, weight decay 1e-6, poly decay, batch 8, "
    "224 px, 40,000 iterations) on a randomly initialised vit_small (nothing is downloaded)",
)


@dataclass
class TrainConfig:
    """Everything one training run needs; one field per ``selgroup-train`` flag.

    Fields left at ``None`` take the machine's default (see :data:`CPU_DEFAULTS`, :data:`GPU_DEFAULTS`).

    Example::

        >>> from selgroup_fast.train import TrainConfig
        >>> config = TrainConfig(method="gd", iters=10, out="run")
        >>> config.method, config.tasks, config.batch_size
        ('gd', 'nyud', 8)
    """

    dataset: str = "scenes"
    data_root: str | None = None
    tasks: str = "nyud"
    method: str = "selective"
    method_options: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    batch_size: int = 8
    iters: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = "adam"
    schedule: str = "poly"
    eval_every: int | None = None
    eval_batches: int | None = None
    checkpoint_every: int | None = None
    resume: str | None = None
    amp: str = "off"
    compile: bool = False
    device: str | None = None
    seed: int = 0
    workers: int | None = None
    data_cache: str = "auto"
    out: str = "train_out"
    baseline: str | None = None
    on_nonfinite: str = "stop"
    log_every: int = 10
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_method_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value is a Python literal when it parses as one, else a string.

    >>> parse_method_option("decay=1e-4"), parse_method_option("order=forward")
    (('decay', 0.0001), ('order', 'forward'))
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise TrainError(f"--method-option expects KEY=VALUE (e.g. decay=1e-4), got {text!r}")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key, value.strip()


def method_error(method: str, error: TypeError | ValueError) -> str:
    """The one line that ``methods.create``'s refusal of ``method``'s options becomes (the trainer's, the planner's).

    >>> method_error("selective", TypeError("__init__() got an unexpected keyword argument 'ordering'"))
    "method 'selective' takes no option 'ordering'"
    >>> method_error("cagrad", ValueError("c must be >= 0, got -1"))
    "method 'cagrad': c must be >= 0, got -1"
    """
    message = str(error)
    if isinstance(error, TypeError) and "unexpected keyword argument" in message:
        option = message.split("unexpected keyword argument")[-1].strip(" '\"")
        return f"method {method!r} takes no option {option!r}"
    return f"method {method!r}: {message}"


def resolve(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, str | None]:
    """A copy of ``config`` with the machine's defaults filled in and every value checked.

    Returns the copy and the note saying which defaults were used (None when the size and
    length were all given).
    """
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    used_defaults = config.img_size is None and config.patch_size is None and config.iters is None
    filled = dataclasses.replace(
        config,
        method_options=dict(config.method_options),
        backbone=config.backbone or defaults.backbone,
        img_size=config.img_size or defaults.img_size,
        patch_size=config.patch_size or defaults.patch_size,
        iters=config.iters or defaults.iters,
        lr=defaults.lr if config.lr is None else config.lr,
        weight_decay=defaults.weight_decay if config.weight_decay is None else config.weight_decay,
        device=str(device),
        workers=defaults.workers if config.workers is None else config.workers,
    )
    iters = filled.iters
    assert iters is not None
    if filled.eval_every is None:
        filled.eval_every = max(iters // 5, 1)
    if filled.checkpoint_every is None:
        filled.checkpoint_every = min(defaults.checkpoint_every, iters)
    _check(filled)
    return filled, (defaults.note if used_defaults else None)


def _check(config: TrainConfig) -> None:
    for name in ("img_size", "patch_size", "batch_size", "iters", "eval_every", "checkpoint_every", "log_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if config.eval_batches is not None and (isinstance(config.eval_batches, bool) or config.eval_batches < 1):
        raise TrainError(f"--eval-batches must be a positive integer, got {config.eval_batches!r}")
    assert config.workers is not None
    if config.workers < 0:
        raise TrainError(f"--workers must be >= 0, got {config.workers}")
    assert config.img_size is not None and config.patch_size is not None
    if config.img_size % config.patch_size:
        raise TrainError(f"--img-size {config.img_size} is not a multiple of --patch-size {config.patch_size}")
    assert config.lr is not None and config.weight_decay is not None
    if not config.lr > 0:
        raise TrainError(f"--lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise TrainError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("amp", AMP_MODES),
        ("data_cache", DATA_CACHE_MODES),
        ("on_nonfinite", tuple(ON_NONFINITE)),
    ):
        if getattr(config, name) not in allowed:
            raise TrainError(
                f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}"
            )
