"""Run by tests/test_train_ddp.py under torchrun (and imported by it for the one-process reference):
gd and selective through fit() on a small model and data of the user's own, where the mean of the
ranks' batch losses is the loss of their union (equal pixel counts), so that DDP over 2 processes
of batch B must match one process of batch 2B."""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset

from selgroup_fast.bench.model import TaskSpec
from selgroup_fast.train import TrainConfig, fit

TASKS = [TaskSpec("square", "regression", 1), TaskSpec("negated", "regression", 1), TaskSpec("shift", "regression", 1)]
METHODS = {"gd": {}, "selective": {"warmup_steps": 2, "decay": 0.1}}
ITERS = 6


class MapData(Dataset):
    def __init__(self, count: int, seed: int) -> None:
        self.x = torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        x = self.x[index]
        return x, {"square": x.pow(2), "negated": -x, "shift": x + 1}


class MapModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(8, 1, 1) for _ in TASKS)

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def forward(self, x):
        features = self.encoder(x)
        return [head(features) for head in self.heads]


def train(out: str, batch_size: int) -> None:
    for method, options in METHODS.items():
        torch.manual_seed(0)
        config = TrainConfig(method=method, method_options=options, iters=ITERS, batch_size=batch_size, lr=1e-2,
                             eval_every=ITERS, out=f"{out}/{method}", progress=False, log_every=1)
        fit(config, model=MapModel(), train_data=MapData(64, 0), val_data=MapData(16, 1), tasks=TASKS)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], int(sys.argv[2]))
