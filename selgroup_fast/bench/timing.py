"""The timing loop: per-batch phase breakdown of one method (the paper's Table E.1).

Honest timing rules:

* the first ``warmup`` steps of every method are run and discarded (allocator,
  kernel caches, lazy optimizer state, the selective method's own warm-up);
* the phases come from the method's own profiling (``profile=True``: CUDA events
  on the GPU, wall clock on the CPU), which adds no synchronisation inside a step;
* the total per batch is the wall clock around the whole ``step`` call, with a
  ``torch.cuda.synchronize()`` before and after on the GPU;
* every number reported is the median over the measured steps, and a phase's share
  is its median divided by the median total (so shares need not sum to 100 %; the
  remainder of the total not covered by any phase is reported as ``other``).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import methods
from ..profiling import PHASES
from .model import MultiTaskViT, SyntheticBatch, TaskSpec, synthetic_batch, task_losses

#: The paper's optimizer settings (Table C.1): Adam, lr 2e-5, weight decay 1e-6.
LEARNING_RATE = 2e-5
WEIGHT_DECAY = 1e-6

#: The order in which the default run lists the methods (the rest follow in registry order).
PREFERRED_ORDER = ("gd", "selective", "pcgrad", "cagrad")


class Progress(Protocol):
    """What the timing loop needs of a progress bar (``tqdm`` has it)."""

    def set_description(self, desc: str) -> None: ...

    def update(self, n: int = 1) -> object: ...


class NoProgress:
    """A progress bar that shows nothing."""

    def set_description(self, desc: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


@dataclass(frozen=True)
class BenchConfig:
    """Everything one timing run needs besides the method and the tasks."""

    backbone: str
    img_size: int
    patch_size: int
    batch_size: int
    steps: int
    warmup: int
    device: torch.device
    dtype: torch.dtype
    seed: int


@dataclass
class MethodResult:
    """The medians of one method at one number of tasks."""

    method: str
    num_tasks: int
    phases: dict[str, float]  # median seconds per phase of PHASES (0.0 when the method has no such phase)
    total: float  # median seconds per batch, wall clock around step()
    steps: int  # measured steps
    groups_mean: float | None = None  # average number of groups per measured step (selective)
    peak_memory_bytes: int | None = None
    ratio_to_gd: float | None = None

    @property
    def other(self) -> float:
        """Time of the step outside every phase (loop overhead, zero_grad, ...); never negative."""
        return max(self.total - sum(self.phases.values()), 0.0)

    @property
    def shares(self) -> dict[str, float]:
        """Each phase's median as a fraction of the median total."""
        return {phase: (seconds / self.total if self.total > 0 else 0.0) for phase, seconds in self.phases.items()}


def median_breakdown(phase_samples: Sequence[dict[str, float]], totals: Sequence[float]) -> tuple[dict[str, float], float]:
    """Per-phase medians (a phase absent from a step counts as 0 s there) and the median total."""
    if not totals or len(phase_samples) != len(totals):
        raise ValueError("need one phase sample per measured total, and at least one")
    phases = {phase: statistics.median(sample.get(phase, 0.0) for sample in phase_samples) for phase in PHASES}
    return phases, statistics.median(totals)


def set_ratios_to_gd(results: list[MethodResult]) -> None:
    """Fills ``ratio_to_gd`` of every result when GD was measured at the same K."""
    gd_totals = {r.num_tasks: r.total for r in results if r.method == "gd"}
    for result in results:
        gd_total = gd_totals.get(result.num_tasks)
        result.ratio_to_gd = result.total / gd_total if gd_total else None


def default_methods() -> list[str]:
    """Every method available in this installation, GD, selective, PCGrad, CAGrad first."""
    available = methods.available()
    first = [name for name in PREFERRED_ORDER if name in available]
    return first + [name for name in available if name not in first]


def method_options(name: str, warmup: int) -> dict[str, Any]:
    """Options the bench passes to ``methods.create`` besides the common ones.

    The selective method gets ``warmup_steps`` equal to the bench's warm-up steps, so
    that its own warm-up (one group per task) is over when the measured steps start
    and the measured steps really run the regrouped updates.
    """
    return {"warmup_steps": warmup} if name == "selective" else {}


class _PeakRSS:
    """Samples the process's resident set size in a background thread (Linux ``/proc``).

    The CPU stand-in for ``torch.cuda.max_memory_allocated``: the peak RSS during the
    measured region minus the RSS at its start. Sampling every few milliseconds misses
    shorter spikes, and memory the allocator reuses from earlier methods does not show,
    so it is a lower bound. ``peak_delta`` is ``None`` where ``/proc/self/statm`` is absent
    or when disabled (on a GPU, where the sampling thread would only compete for the GIL).
    """

    _STATM = "/proc/self/statm"
    _INTERVAL_S = 0.002

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._peak = 0

    def _rss(self) -> int:
        with open(self._STATM) as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(self._INTERVAL_S):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> _PeakRSS:
        if self.enabled and os.path.exists(self._STATM):
            self._start = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())

    @property
    def peak_delta(self) -> int | None:
        return self._peak - self._start if self._thread is not None else None


def _release_freed_memory(device: torch.device) -> None:
    """Returns memory freed by earlier runs to the system, so that the next peak counts from a clean floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        # glibc keeps freed heap pages mapped; give them back so that RSS growth shows again.
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MethodFactory(Protocol):
    """Builds a method as ``selgroup_fast.methods.create`` does (the default factory)."""

    def __call__(
        self, name: str, optimizer: torch.optim.Optimizer, num_tasks: int, shared_params: Any = None, **options: Any
    ) -> methods.MultiTaskMethod: ...


@dataclass
class Workload:
    """What every method trains on at one K: the initial model (kept on the CPU) and the batch."""

    tasks: list[TaskSpec]
    initial_model: MultiTaskViT
    batch: SyntheticBatch


def prepare_workload(tasks: list[TaskSpec], config: BenchConfig) -> Workload:
    """The model built once from ``config.seed`` and the synthetic batch generated once on the device."""
    torch.manual_seed(config.seed)
    model = MultiTaskViT(tasks, config.backbone, config.img_size, config.patch_size)
    batch = synthetic_batch(tasks, config.batch_size, config.img_size, config.device, config.dtype, config.seed)
    return Workload(tasks, model, batch)


def _build(
    name: str, workload: Workload, config: BenchConfig, create: MethodFactory, options: dict[str, Any]
) -> tuple[MultiTaskViT, methods.MultiTaskMethod]:
    """A fresh copy of the initial model on the device and method ``name`` driving Adam over it, profiling on.

    Copying the initial model (rather than building it again) gives every method the
    same weights and skips timm's weight initialisation, seconds per method on a CPU.
    """
    model = copy.deepcopy(workload.initial_model).to(config.device, config.dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    method = create(
        name,
        optimizer,
        len(workload.tasks),
        shared_params=model.shared_parameters(),
        profile=True,
        **method_options(name, config.warmup),
        **options,
    )
    return model, method


def warm_up_process(workload: Workload, config: BenchConfig) -> None:
    """One untimed GD step on a throw-away copy of the model before any method is measured.

    The first optimizer step of a process pays one-time costs (lazy imports, library
    and allocator initialisation) in time and memory; without this they would land
    on the first method's warm-up and, for memory, on its peak.
    """
    model, method = _build("gd", workload, config, methods.create, {})
    method.step(lambda: task_losses(model(workload.batch.images), workload.batch.targets, workload.tasks))
    _synchronize(config.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(
    name: str,
    workload: Workload,
    config: BenchConfig,
    progress: Progress | None = None,
    create: MethodFactory = methods.create,
    options: dict[str, Any] | None = None,
) -> MethodResult:
    """Times ``config.steps`` steps of method ``name`` after ``config.warmup`` discarded ones.

    Every method starts from a copy of the workload's initial model and trains on its
    batch. ``progress`` advances by one per step. ``create`` builds the method (``methods.create``, or a stand-in with its
    signature such as the reference loop of ``benchmarks/reference_loop.py``), with
    ``options`` added to the bench's own (:func:`method_options`).
    """
    progress = progress if progress is not None else NoProgress()
    device = config.device
    _release_freed_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS(enabled=device.type != "cuda") as rss:
        model, method = _build(name, workload, config, create, options or {})
        batch, tasks = workload.batch, workload.tasks

        def closure() -> list[torch.Tensor]:
            return task_losses(model(batch.images), batch.targets, tasks)

        phase_samples: list[dict[str, float]] = []
        totals: list[float] = []
        group_counts: list[int] = []
        for step in range(config.warmup + config.steps):
            measured = step >= config.warmup
            # `groups` holds the groups the coming step will use (read between steps:
            # never inside the timed region).
            groups = getattr(method, "groups", None) if measured else None
            if groups is not None:
                group_counts.append(len(groups))
            _synchronize(device)
            begin = time.perf_counter()
            method.step(closure)
            _synchronize(device)
            elapsed = time.perf_counter() - begin
            if measured:
                totals.append(elapsed)
                phase_samples.append(method.timings)
            progress.update(1)
    phases, total = median_breakdown(phase_samples, totals)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak_delta
    return MethodResult(
        method=name,
        num_tasks=len(workload.tasks),
        phases=phases,
        total=total,
        steps=config.steps,
        groups_mean=statistics.fmean(group_counts) if group_counts else None,
        peak_memory_bytes=peak,
    )


@dataclass
class Suite:
    """The results of a run: one list of method results per number of tasks."""

    config: BenchConfig
    tasks: dict[int, list[TaskSpec]]
    results: dict[int, list[MethodResult]] = field(default_factory=dict)


def run_suite(
    method_names: Sequence[str],
    task_sets: Sequence[list[TaskSpec]],
    config: BenchConfig,
    progress: Progress | None = None,
) -> Suite:
    """Times every method at every task set (one workload per task set)."""
    progress = progress if progress is not None else NoProgress()
    suite = Suite(config=config, tasks={len(tasks): tasks for tasks in task_sets})
    for tasks in task_sets:
        progress.set_description(f"K={len(tasks)} model")
        workload = prepare_workload(tasks, config)
        if not suite.results:
            progress.set_description("process warm-up")
            warm_up_process(workload, config)
        results = []
        for name in method_names:
            progress.set_description(f"K={len(tasks)} {name}")
            results.append(run_method(name, workload, config, progress))
        set_ratios_to_gd(results)
        suite.results[len(tasks)] = results
    return suite
