"""Shared test pieces: every device the build supports, both float dtypes, the tiny
multi-task model and problems every test file trains on, and a one-thread fixture.

Test files import the model and problem helpers with ``from conftest import ...``
(pytest puts ``tests/`` on ``sys.path``); float64 references live in ``reference.py``.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

import selgroup_fast


def _devices() -> list:
    devices = ["cpu"]
    if torch.cuda.is_available() and selgroup_fast.ops.cuda_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


DEVICES = _devices()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def pytest_report_header(config) -> str:
    return (
        f"selgroup_fast: torch {torch.__version__}, CUDA kernels built: {selgroup_fast.ops.cuda_available()}, "
        f"GPU visible: {torch.cuda.is_available()}"
    )


class TinyMultiTask(torch.nn.Module):
    """A shared encoder (``layers`` × Linear + tanh) and one linear regression head per task.

    ``forward(x)`` returns one ``[B]`` prediction per task.
    """

    def __init__(
        self,
        num_tasks: int = 3,
        in_features: int = 5,
        hidden: int = 6,
        layers: int = 1,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * layers
        blocks: list[torch.nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=False):
            blocks += [torch.nn.Linear(fan_in, fan_out, dtype=dtype), torch.nn.Tanh()]
        self.encoder = torch.nn.Sequential(*blocks)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 1, dtype=dtype) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        return [head(features).squeeze(-1) for head in self.heads]


def regression_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-task mean squared errors of ``model(x)``; ``y`` holds one target column per task."""
    return [(out - y[:, k]).pow(2).mean() for k, out in enumerate(model(x))]


def step_on_one_batch(method, closure):
    """``method.step(closure)``; a method that reads two batches per step (MoDo, SDMGrad) is told explicitly that
    ``closure`` is its second batch too (A = G). The registry-wide tests check what holds on any batches; the
    two-batch rule on two batches is tests/test_stateful_methods.py's."""
    if getattr(method, "reads_two_batches", False):
        return method.step(closure, second_closure=closure)
    return method.step(closure)


class Problem(NamedTuple):
    """A model, its twin with identical parameters and one batch ``(x, y)``."""

    model: TinyMultiTask
    twin: TinyMultiTask
    x: torch.Tensor
    y: torch.Tensor

    def closure(self, model: torch.nn.Module | None = None):
        """The training closure of ``model`` (default: the problem's model) on the batch."""
        target = self.model if model is None else model
        return lambda: regression_losses(target, self.x, self.y)


def make_problem(
    num_tasks: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    batch: int = 16,
    *,
    device: str | torch.device = "cpu",
    in_features: int = 5,
    hidden: int = 6,
    layers: int = 1,
    correlated: bool = False,
) -> Problem:
    """A seeded tiny problem. ``correlated=True`` draws targets from a common latent
    (``y = tanh(x W)``) so that the tasks partly agree and partly conflict; otherwise
    the targets are independent standard normals."""
    torch.manual_seed(seed)
    model = TinyMultiTask(num_tasks, in_features, hidden, layers, dtype).to(device)
    twin = TinyMultiTask(num_tasks, in_features, hidden, layers, dtype).to(device)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(batch, in_features, dtype=torch.float64)
    if correlated:
        y = torch.tanh(x @ torch.randn(in_features, num_tasks, dtype=torch.float64))
    else:
        y = torch.randn(batch, num_tasks, dtype=torch.float64)
    return Problem(model, twin, x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype))


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, port: int, world_size: int) -> None:
    """Joins a gloo process group on 127.0.0.1 (one torch thread: the ranks share 2 cores)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as module ``name`` (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
