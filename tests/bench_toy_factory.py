"""Model factories for the selgroup-bench tests (``--model bench_toy_factory:build``): a working one and broken ones.

The model is the tests' tiny multi-task regression problem (``conftest.make_problem``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import make_problem, regression_losses
from torch import nn

from selgroup_fast.models import BenchModel, ModelRequest

NOT_CALLABLE = 42

#: The autocast dtype each closure call ran under (None: no autocast), newest last.
AUTOCAST_SEEN: list[torch.dtype | None] = []


def build(request: ModelRequest) -> BenchModel:
    """K regression tasks (``request.tasks`` a number, default 3) on one random batch."""
    num_tasks = int(request.tasks or 3)
    problem = make_problem(num_tasks, request.seed, request.dtype, request.batch_size, device=request.device)
    model, device_type = problem.model, request.device.type

    def closure_on(rows: slice) -> Callable[[], list[torch.Tensor]]:
        def closure() -> list[torch.Tensor]:
            enabled = torch.is_autocast_enabled(device_type)
            AUTOCAST_SEEN.append(torch.get_autocast_dtype(device_type) if enabled else None)
            return regression_losses(model, problem.x[rows], problem.y[rows])

        return closure

    half = request.batch_size // 2
    return BenchModel(
        model=model,
        shared_params=list(model.encoder.parameters()),
        task_params=list(model.heads.parameters()),
        closure=closure_on(slice(None)),
        task_names=[f"task{k}" for k in range(num_tasks)],
        description="tiny MLP",
        halves=(closure_on(slice(None, half)), closure_on(slice(half, None))),
    )


def wrong_type(request: ModelRequest) -> nn.Module:
    return build(request).model


def wrong_losses(request: ModelRequest) -> BenchModel:
    built = build(request)
    closure = built.closure
    built.closure = lambda: closure()[:-1]
    return built


def foreign_params(request: ModelRequest) -> BenchModel:
    built = build(request)
    built.shared_params = [nn.Parameter(torch.zeros(3))]
    return built
