"""Shared pieces of the trainer tests: tiny run settings, a subprocess runner, checkpoint reading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: A tiny run: the CPU default backbone (test_vit) on 16 px images (4 patches), batch 2, 2 eval batches, no workers.
TINY = {"img_size": 16, "patch_size": 8, "batch_size": 2, "eval_batches": 2, "progress": False, "log_every": 1,
        "workers": 0}
TINY_ARGS = ["--img-size", "16", "--patch-size", "8", "--batch-size", "2", "--eval-batches", "2", "--quiet", "--workers", "0",
             "--log-every", "1"]


def subprocess_env() -> dict[str, str]:
    """The environment of a trainer subprocess: this checkout importable, one thread (the runs compared
    bitwise must use the same thread count, and the shared CI machine has 2 cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "selgroup_fast.train", *args]


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args), env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
