"""Per-phase timing of one training step (the phases of the paper's Table E.1).

On CUDA each phase is bracketed by CUDA events recorded on the current stream,
so profiling adds no host synchronisation inside the step; the events are read
(one synchronisation) only when :attr:`PhaseTimer.timings` is asked for. On the
CPU, kernels run synchronously, so ``time.perf_counter`` brackets are exact.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

#: The phases of the paper's per-batch breakdown (Table E.1), in display order.
PHASES: tuple[str, ...] = ("forward", "backward", "manipulation", "optimizer", "affinity")
#: Their column titles, as the paper's Table E.1 names them (the bench's tables and charts).
PHASE_TITLES: dict[str, str] = {
    "forward": "forward",
    "backward": "backprop",
    "manipulation": "grad manipulation",
    "optimizer": "optimizer step",
    "affinity": "clustering + affinity",
}


class PhaseTimer:
    """Accumulates the time spent in named phases during one step.

    Disabled timers cost one attribute check per phase and record nothing.
    """

    def __init__(self, enabled: bool = False, device: torch.device | str | None = None) -> None:
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cpu: dict[str, float] = {}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @property
    def uses_cuda_events(self) -> bool:
        return self.device.type == "cuda"

    def reset(self) -> None:
        """Forgets the previous step's phases; call at the start of every step."""
        self._cpu = {}
        self._events = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time spent inside the ``with`` block to phase ``name``."""
        if not self.enabled:
            yield
            return
        if self.uses_cuda_events:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            begin = time.perf_counter()
            yield
            self._cpu[name] = self._cpu.get(name, 0.0) + time.perf_counter() - begin

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase of the last step (synchronises on the last CUDA event)."""
        if not self.enabled:
            return {}
        out = dict(self._cpu)
        for name, pairs in self._events.items():
            pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return {name: out[name] for name in sorted(out, key=_phase_rank)}


def _phase_rank(name: str) -> tuple[int, str]:
    return (PHASES.index(name) if name in PHASES else len(PHASES), name)
