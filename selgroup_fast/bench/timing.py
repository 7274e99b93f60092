"""The timing loop: the per-batch phase breakdown of every method (the paper's Table E.1), in interleaved rounds.

Fair timing rules:

* every method starts from the same initial weights (the model is built once per K)
  and runs ``warmup`` discarded steps first, one method after the other (allocator,
  kernel caches, lazy optimizer state, the selective method's own warm-up); its peak
  memory is taken over these steps;
* the measured steps run in ``rounds`` interleaved rounds: each round runs every method
  for ``steps`` steps, in an order rotated by M / rounds places from one round to the
  next (M methods), so that no method always runs early or late: a machine that speeds
  up or slows down over the run (other jobs, clocks, caches) shifts every method alike.
  Each method keeps its own weights, optimizer and state across rounds (its weights
  are copied into the one model before its turn and back after it, outside the timed
  region);
* the phases come from the method's own profiling (``profile=True``: CUDA events on the
  GPU, wall clock on the CPU), which adds no synchronisation inside a step; the total
  per batch is the wall clock around the whole ``step`` call, with a
  ``torch.cuda.synchronize()`` before and after on the GPU;
* the phases and the total are medians over all measured steps; the ratio to the
  baseline (GD) is *paired*: in each round, the method's median step over GD's median
  step of the same round; the reported ratio is the median of the per-round ratios and
  its spread their median absolute deviation. GD's per-round medians show the
  machine's drift over the run, which the paired ratios cancel.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from .. import methods
from ..losses import ClosureOutput
from ..models import BenchModel, ModelError, ModelFactory, ModelRequest, build_model, factory_name, vit_bench_model
from ..profiling import PHASES

#: The paper's optimizer settings (Table C.1): Adam, lr 2e-5, weight decay 1e-6.
LEARNING_RATE = 2e-5
WEIGHT_DECAY = 1e-6

#: The order in which the default run lists the methods (the rest follow in registry order).
PREFERRED_ORDER = ("gd", "selective", "pcgrad", "cagrad")

#: ``--amp`` choices: the autocast dtype of the forward pass (the closure).
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16}
#: Where the gradient methods take the per-task gradients: the shared parameters or the shared features.
SPACES = ("parameters", "representation")


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
    """How to time: batch, rounds, steps, device, dtype, seed, autocast (the model comes from a factory).

    ``rounds`` × ``steps`` steps of every method are measured (``steps`` per method
    per round), after ``warmup`` discarded ones. ``amp="bf16"`` runs the forward
    pass (the closure) under ``torch.autocast`` in bfloat16.
    """

    batch_size: int = 8
    rounds: int = 8
    steps: int = 1
    warmup: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    amp: str | None = None
    space: str = "parameters"

    def __post_init__(self) -> None:
        for name in ("batch_size", "rounds", "steps", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.amp is not None and self.dtype != torch.float32:
            raise ValueError(f"autocast (amp={self.amp}) needs float32 weights, got {self.dtype}")

    def request(self, tasks: str | None) -> ModelRequest:
        """What the model factory is asked for at ``tasks`` (a ``--tasks`` value, ``None``: its default)."""
        return ModelRequest(
            tasks=tasks, batch_size=self.batch_size, device=self.device, dtype=self.dtype, seed=self.seed
        )


@dataclass
class MethodResult:
    """One method at one number of tasks: medians, per-round medians and the paired ratios."""

    method: str
    num_tasks: int
    phases: dict[str, float]  # median seconds per phase of PHASES (0.0 when the method has no such phase)
    total: float  # median seconds per batch, wall clock around step()
    steps: int  # measured steps
    round_totals: list[float] = field(default_factory=list)  # the median step of each round
    round_ratios: list[float] | None = None  # each round's median over the baseline's in the same round
    groups_mean: float | None = None  # average number of groups per measured step (selective)
    peak_memory_bytes: int | None = None
    state_bytes: int = 0  # the method's state kept between steps (MultiTaskMethod.state_bytes) after its warm-up

    @property
    def other(self) -> float:
        """Time of the step outside every phase (loop overhead, zero_grad, ...); never negative."""
        return max(self.total - sum(self.phases.values()), 0.0)

    @property
    def shares(self) -> dict[str, float]:
        """Each phase's median as a fraction of the median total."""
        return {phase: (seconds / self.total if self.total > 0 else 0.0) for phase, seconds in self.phases.items()}

    @property
    def ratio(self) -> float | None:
        """The median of the per-round paired ratios to the baseline (``None`` without a baseline)."""
        return statistics.median(self.round_ratios) if self.round_ratios else None

    @property
    def ratio_mad(self) -> float | None:
        """The median absolute deviation of the per-round ratios from :attr:`ratio`."""
        ratio = self.ratio
        if ratio is None or self.round_ratios is None:
            return None
        return statistics.median(abs(value - ratio) for value in self.round_ratios)


def median_breakdown(
    phase_samples: Sequence[dict[str, float]], totals: Sequence[float]
) -> tuple[dict[str, float], float]:
    """Per-phase medians (a phase absent from a step counts as 0 s there) and the median total."""
    if not totals or len(phase_samples) != len(totals):
        raise ValueError("need one phase sample per measured total, and at least one")
    phases = {phase: statistics.median(sample.get(phase, 0.0) for sample in phase_samples) for phase in PHASES}
    return phases, statistics.median(totals)


def set_paired_ratios(results: list[MethodResult], baseline: str) -> None:
    """Sets every result's ``round_ratios`` against the result named ``baseline`` (``None`` when it is absent)."""
    base = next((result for result in results if result.method == baseline), None)
    for result in results:
        result.round_ratios = (
            None
            if base is None
            else [mine / theirs for mine, theirs in zip(result.round_totals, base.round_totals, strict=True)]
        )


def rotated(items: Sequence[Any], round_index: int, rounds: int) -> list[Any]:
    """``items`` rotated left by ``round_index · len(items) // rounds`` places (round r's running order).

    >>> [rotated("ABCD", r, 4) for r in range(4)]
    [['A', 'B', 'C', 'D'], ['B', 'C', 'D', 'A'], ['C', 'D', 'A', 'B'], ['D', 'A', 'B', 'C']]
    >>> [rotated("ABCD", r, 2) for r in range(2)]
    [['A', 'B', 'C', 'D'], ['C', 'D', 'A', 'B']]
    """
    offset = round_index * len(items) // rounds % max(len(items), 1)
    return [*items[offset:], *items[:offset]]


def default_methods() -> list[str]:
    """Every method available in this installation, GD, selective, PCGrad, CAGrad first."""
    available = methods.available()
    first = [name for name in PREFERRED_ORDER if name in available]
    return first + [name for name in available if name not in first]


def method_options(name: str, warmup: int, space: str = "parameters") -> dict[str, Any]:
    """Options the bench passes to ``methods.create`` besides the common ones.

    The selective method gets ``warmup_steps`` equal to the bench's warm-up steps, so
    that its own warm-up (one group per task) is over when the measured steps start
    and the measured steps really run the regrouped updates. The gradient methods get
    ``space`` (``"representation"``: per-task gradients with respect to the shared features).
    Every method gets ``nonfinite="propagate"``: its own cost, without the guard.
    """
    # Every method is timed without the non-finite guard, as the peers' loops run: the
    # bench's loss is always finite, and "skip" with a non-fused optimizer adds a masked
    # copy of the parameters and their state to every step (docs/training.md §Non-finite losses).
    options: dict[str, Any] = {"nonfinite": "propagate"}
    if name == "selective":
        options["warmup_steps"] = warmup
    elif space != "parameters" and methods.kind(name) == "gradient":
        options["space"] = space
    return options


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


class MethodBuilder(Protocol):
    """Builds a method as ``selgroup_fast.methods.create`` does (the default factory)."""

    def __call__(
        self, name: str, optimizer: torch.optim.Optimizer, num_tasks: int, shared_params: Any = None, **options: Any
    ) -> methods.MultiTaskMethod: ...


@dataclass
class Workload:
    """What every method trains on at one K: the model, its closure and the initial weights."""

    bench: BenchModel
    initial: list[torch.Tensor]  # copies of the model's parameters and buffers before any step

    @property
    def num_tasks(self) -> int:
        return len(self.bench.task_names)


def _state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        torch._foreach_copy_(list(targets), list(sources))


def prepare_workload(factory: ModelFactory, request: ModelRequest) -> Workload:
    """The factory's model, checked (:func:`~selgroup_fast.models.build_model`), and its initial weights."""
    bench = build_model(factory, request)
    return Workload(bench, [tensor.detach().clone() for tensor in _state_tensors(bench.model)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_autocast(closure: Callable[[], ClosureOutput], config: BenchConfig) -> Callable[[], ClosureOutput]:
    if config.amp is None:
        return closure
    dtype = AMP_DTYPES[config.amp]

    def autocast_closure() -> ClosureOutput:
        with torch.autocast(config.device.type, dtype=dtype):
            return closure()

    return autocast_closure


def _step_of(
    method: methods.MultiTaskMethod,
    closure: Callable[[], ClosureOutput],
    halves: Sequence[Callable[[], ClosureOutput]] | None,
) -> Callable[[], torch.Tensor]:
    """One step of ``method`` on the bench's batch; a method that reads two batches per step (MoDo, SDMGrad)
    gets its two halves, as ``selgroup-train`` gives them."""
    if not method.reads_two_batches:
        return lambda: method.step(closure)
    if halves is None:
        raise ModelError(
            f"{method.name} reads two batches per step: the model's BenchModel.halves must give the two halves of "
            "its batch (the built-in model's need --batch-size 2 or more)"
        )
    first, second = halves
    return lambda: cast(Any, method).step(first, second)


@dataclass
class _Contestant:
    """One method in the rounds: its own weights between turns and its measurements."""

    name: str
    method: methods.MultiTaskMethod
    step: Callable[[], torch.Tensor]  # one step of the method on the bench's batch (:func:`_step_of`)
    weights: list[torch.Tensor]
    peak_memory_bytes: int | None
    totals: list[float] = field(default_factory=list)
    phase_samples: list[dict[str, float]] = field(default_factory=list)
    round_totals: list[float] = field(default_factory=list)
    group_counts: list[int] = field(default_factory=list)


def run_methods(
    method_names: Sequence[str],
    workload: Workload,
    config: BenchConfig,
    progress: Progress | None = None,
    create: MethodBuilder = methods.create,
    baseline: str = "gd",
) -> list[MethodResult]:
    """Times every method on ``workload``: warm-up one after the other, then the interleaved rounds.

    ``create`` builds a method (``methods.create``, or a stand-in with its signature such
    as the reference loop of ``benchmarks/reference_loop.py``); every method gets Adam
    over the shared and task parameters, ``profile=True`` and :func:`method_options`.
    ``progress`` advances by one per step. The ratios are paired against ``baseline``.
    """
    progress = progress if progress is not None else NoProgress()
    device, bench = config.device, workload.bench
    state = _state_tensors(bench.model)
    trainable = [*bench.shared_params, *bench.task_params]
    closure = _with_autocast(bench.closure, config)
    halves = None if bench.halves is None else [_with_autocast(half, config) for half in bench.halves]

    def start_turn(weights: Sequence[torch.Tensor]) -> None:
        """Puts a method's weights into the model, gradients cleared (outside every timed region)."""
        _copy_into(state, weights)
        for param in trainable:
            param.grad = None

    def build(name: str) -> methods.MultiTaskMethod:
        optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        return create(
            name,
            optimizer,
            workload.num_tasks,
            shared_params=bench.shared_params,
            profile=True,
            **method_options(name, config.warmup, config.space),
        )

    # The first optimizer step of a process (or on a new model) pays one-time costs (lazy
    # imports, library and allocator initialisation) in time and memory; one untimed GD
    # step absorbs them instead of the first method's warm-up and peak.
    start_turn(workload.initial)
    methods.create("gd", torch.optim.Adam(trainable, lr=LEARNING_RATE), workload.num_tasks).step(closure)
    _synchronize(device)

    contestants = []
    for name in method_names:
        progress.set_description(f"K={workload.num_tasks} {name} warm-up")
        _release_freed_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        floor = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with _PeakRSS(enabled=device.type != "cuda") as rss:
            start_turn(workload.initial)
            method = build(name)
            step = _step_of(method, closure, halves)
            for _ in range(config.warmup):
                step()
                progress.update(1)
            _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - floor if device.type == "cuda" else rss.peak_delta
        contestants.append(_Contestant(name, method, step, [tensor.detach().clone() for tensor in state], peak))

    for round_index in range(config.rounds):
        for contestant in rotated(contestants, round_index, config.rounds):
            progress.set_description(
                f"K={workload.num_tasks} round {round_index + 1}/{config.rounds} {contestant.name}"
            )
            method = contestant.method
            start_turn(contestant.weights)
            round_times = []
            for _ in range(config.steps):
                # `groups` holds the groups the coming step will use (read between steps:
                # never inside the timed region).
                groups = getattr(method, "groups", None)
                if groups is not None:
                    contestant.group_counts.append(len(groups))
                _synchronize(device)
                begin = time.perf_counter()
                contestant.step()
                _synchronize(device)
                round_times.append(time.perf_counter() - begin)
                contestant.phase_samples.append(method.timings)
                progress.update(1)
            contestant.totals += round_times
            contestant.round_totals.append(statistics.median(round_times))
            _copy_into(contestant.weights, state)

    results = []
    for contestant in contestants:
        phases, total = median_breakdown(contestant.phase_samples, contestant.totals)
        results.append(
            MethodResult(
                method=contestant.name,
                num_tasks=workload.num_tasks,
                phases=phases,
                total=total,
                steps=len(contestant.totals),
                round_totals=contestant.round_totals,
                groups_mean=statistics.fmean(contestant.group_counts) if contestant.group_counts else None,
                peak_memory_bytes=contestant.peak_memory_bytes,
                state_bytes=contestant.method.state_bytes,
            )
        )
    set_paired_ratios(results, baseline)
    return results


@dataclass
class Suite:
    """The results of a run: one list of method results per number of tasks K."""

    config: BenchConfig
    model: str  # the factory, as --model spells it
    description: str  # the model in one line (BenchModel.description)
    tasks: dict[int, list[str]] = field(default_factory=dict)  # the task names at each K
    results: dict[int, list[MethodResult]] = field(default_factory=dict)
    breakdown: int = 0  # the K of the breakdown table (the first task request's)


def run_suite(
    method_names: Sequence[str],
    config: BenchConfig = BenchConfig(),
    factory: ModelFactory = vit_bench_model,
    tasks: Sequence[str | None] = (None,),
    progress: Progress | None = None,
) -> Suite:
    """Times every method on the model ``factory`` builds for each entry of ``tasks`` (a K met twice runs once).

    The first entry's K is the breakdown table's; more entries make a sweep. Example
    (the same outputs as the command with :func:`~selgroup_fast.bench.write_outputs`)::

        >>> from selgroup_fast.bench import BenchConfig, run_suite
        >>> from functools import partial
        >>> tiny = partial(vit_bench_model, backbone="test_vit", img_size=32)
        >>> suite = run_suite(["gd", "uw"], BenchConfig(batch_size=2, rounds=2, steps=1, warmup=1), tiny, ["2"])
        >>> [(r.method, r.num_tasks, r.steps, len(r.round_ratios)) for r in suite.results[2]]
        [('gd', 2, 2, 2), ('uw', 2, 2, 2)]
    """
    progress = progress if progress is not None else NoProgress()
    suite: Suite | None = None
    for entry in tasks:
        progress.set_description(f"model ({entry or 'default tasks'})")
        workload = prepare_workload(factory, config.request(entry))
        if suite is None:
            suite = Suite(config, factory_name(factory), workload.bench.description, breakdown=workload.num_tasks)
        if workload.num_tasks not in suite.results:
            suite.tasks[workload.num_tasks] = list(workload.bench.task_names)
            suite.results[workload.num_tasks] = run_methods(method_names, workload, config, progress)
        del workload
    if suite is None:
        raise ValueError("tasks must name at least one task set (None: the factory's default)")
    return suite
