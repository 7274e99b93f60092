"""Shared pieces of the SelectiveGroupUpdate tests: a tiny multi-task model and a
float64 reference of the affinity update written from ``design/algorithm.md``."""

from __future__ import annotations

import math

import pytest
import torch


class TinyMultiTask(torch.nn.Module):
    """A shared encoder and one linear regression head per task."""

    def __init__(self, in_features: int = 5, hidden: int = 6, num_tasks: int = 3, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.encoder = torch.nn.Linear(in_features, hidden, dtype=dtype)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 1, dtype=dtype) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = torch.tanh(self.encoder(x))
        return [head(features).squeeze(1) for head in self.heads]


def regression_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-task mean squared errors; ``y`` holds one target column per task."""
    return [(out - y[:, k]).pow(2).mean() for k, out in enumerate(model(x))]


def make_problem(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64, batch: int = 16):
    """A model, its twin with identical parameters and one batch ``(x, y)``."""
    torch.manual_seed(seed)
    model = TinyMultiTask(num_tasks=num_tasks, dtype=dtype)
    twin = TinyMultiTask(num_tasks=num_tasks, dtype=dtype)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(batch, 5, dtype=dtype)
    y = torch.randn(batch, num_tasks, dtype=dtype)
    return model, twin, x, y


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def reference_affinity_update(
    affinity: torch.Tensor, before: list[float], after: list[float], group: list[int], decay: float
) -> torch.Tensor:
    """One EMA update of the K×K affinity, entry by entry, exactly as algorithm.md states it."""
    updated = affinity.clone().double()
    num_tasks = len(before)
    size = len(group)

    def ratio(t: int) -> float:
        return (1.0 - after[t] / before[t]) / size

    def ema(s: int, t: int, value: float) -> None:
        if math.isfinite(value):
            updated[s, t] = (1 - decay) * updated[s, t] + decay * value

    for s in group:
        for t in range(num_tasks):
            if not _positive_finite(before[t]):
                continue
            r_t = ratio(t)
            if t not in group:
                ema(s, t, r_t)
                continue
            if not _positive_finite(before[s]):
                continue
            r_s = ratio(s)
            if s == t:
                if r_t >= 0:
                    ema(s, t, r_t)
            elif r_t * r_s >= 0:
                ema(s, t, r_t)
            else:
                ema(s, t, -max(r_t, r_s))
    return updated


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
