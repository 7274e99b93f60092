"""Shared pieces of the trainer tests: tiny run settings, a subprocess runner, checkpoint reading,
a user's own small model and data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]

#: A tiny run: the CPU default backbone (test_vit) on 16 px images (4 patches), batch 2, 2 eval batches, no workers.
TINY = {
    "img_size": 16,
    "patch_size": 8,
    "batch_size": 2,
    "eval_batches": 2,
    "progress": False,
    "log_every": 1,
    "workers": 0,
}
TINY_ARGS = [
    "--img-size",
    "16",
    "--patch-size",
    "8",
    "--batch-size",
    "2",
    "--eval-batches",
    "2",
    "--quiet",
    "--workers",
    "0",
    "--log-every",
    "1",
]


def subprocess_env() -> dict[str, str]:
    """The environment of a trainer subprocess: this checkout importable, one thread (the runs compared
    bitwise must use the same thread count, and the shared CI machine has 2 cores), and no GPU: the
    commands' defaults depend on the device (on a GPU the no-argument run is the paper's 40,000
    iterations), and these runs are sized and compared for the CPU."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "selgroup_fast.train", *args]


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(*args),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


#: Regression targets computed from the input map: a user's own tasks, unknown to selgroup_fast.metrics.
MAP_TARGETS = {"square": lambda x: x.pow(2), "negated": lambda x: -x, "shift": lambda x: x + 1}


class MapData(Dataset):
    """A user's own data: 8×8 single-channel maps, with the targets of ``tasks`` (names of MAP_TARGETS)."""

    def __init__(self, count: int, seed: int, tasks: list[str]) -> None:
        self.tasks = list(tasks)
        self.x = torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        x = self.x[index]
        return x, {task: MAP_TARGETS[task](x) for task in self.tasks}


class MapModel(torch.nn.Module):
    """A user's own model: a conv encoder shared by ``num_tasks`` 1×1 conv heads."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(8, 1, 1) for _ in range(num_tasks))

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def forward(self, x):
        features = self.encoder(x)
        return [head(features) for head in self.heads]
