"""Run by tests/test_train_ddp.py under torchrun (and imported by it for the one-process reference):
gd, selective, a gradient method (pcgrad) and a loss-weighting one (uw) through fit() on a small model and data of the user's own, where the mean of the
ranks' batch losses is the loss of their union (equal pixel counts), so that DDP over 2 processes
of batch B must match one process of batch 2B."""

from __future__ import annotations

import sys

import torch
from train_helpers import MapData, MapModel

from selgroup_fast.tasks import TaskSpec
from selgroup_fast.train import TrainConfig, fit

NAMES = ["square", "negated", "shift"]
TASKS = [TaskSpec(name, "regression", 1) for name in NAMES]
METHODS = {"gd": {}, "selective": {"warmup_steps": 2, "decay": 0.1}, "pcgrad": {}, "uw": {}}
ITERS = 6


def train(out: str, batch_size: int) -> None:
    for method, options in METHODS.items():
        torch.manual_seed(0)
        config = TrainConfig(
            method=method,
            method_options=options,
            iters=ITERS,
            batch_size=batch_size,
            lr=1e-2,
            eval_every=ITERS,
            out=f"{out}/{method}",
            progress=False,
            log_every=1,
        )
        fit(
            config,
            model=MapModel(len(TASKS)),
            train_data=MapData(64, 0, NAMES),
            val_data=MapData(16, 1, NAMES),
            tasks=TASKS,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], int(sys.argv[2]))
    torch.distributed.destroy_process_group()
