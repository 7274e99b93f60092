"""The training batches: a resumable shuffled shard per rank, endless from a position, targets checked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..tasks import TaskSpec
from .config import TrainConfig, TrainError


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a shuffled shard per rank, reshuffled every epoch) that can start mid-epoch.

    ``skip`` drops the first samples of this rank's shard, so that a resumed run sees exactly the
    batches the interrupted run had not reached yet.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Any:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class TrainBatches:
    """Endless training batches from a position (:attr:`epoch`, :attr:`batch_in_epoch`: checkpointed).

    A Dataset is drawn through a :class:`ResumableSampler` (this rank's shard); a user's
    DataLoader is replayed up to the position.
    """

    def __init__(self, data: Any, config: TrainConfig, world_size: int, rank: int, device: torch.device) -> None:
        self.epoch = 0
        self.batch_in_epoch = 0
        self._batch_size = config.batch_size
        self.sampler: ResumableSampler | None = None
        if isinstance(data, DataLoader):
            self.loader = data
            return
        self.sampler = ResumableSampler(data, world_size, rank, config.seed)
        if self.sampler.num_samples < config.batch_size:
            raise TrainError(
                f"the training set has {len(data)} items: too few for --batch-size {config.batch_size}"
                + (f" on each of {world_size} processes" if world_size > 1 else "")
            )
        self.loader = DataLoader(
            data,
            batch_size=config.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=config.workers or 0,
            pin_memory=device.type == "cuda",
            # its own generator: creating an iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(config.seed),
        )

    def __iter__(self) -> Iterator[Any]:
        """The batches from the current position on; the position moves with every batch taken."""
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.skip = self.batch_in_epoch * self._batch_size
                iterator = iter(self.loader)
            else:
                iterator = iter(self.loader)
                for _ in range(self.batch_in_epoch):  # a user's DataLoader: replay up to the position
                    next(iterator)
            for batch in iterator:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def as_list(targets: Any, specs: list[TaskSpec]) -> list[torch.Tensor]:
    """A batch's targets in task order (from a dict by task name or a sequence in task order)."""
    if isinstance(targets, dict):
        return [targets[spec.name] for spec in specs]
    return list(targets)


def checked_targets(targets: Any, specs: list[TaskSpec], device: torch.device) -> list[torch.Tensor]:
    """A batch's targets in task order on the device, their labels checked against the heads first
    (on the loader's CPU tensors: no device synchronisation; a CUDA device-side assert otherwise).

    A label-kind target with a label its task's head has no class for is refused in one line.
    """
    listed = as_list(targets, specs)
    for spec, target in zip(specs, listed, strict=True):
        label = spec.label_outside_head(target)
        if label is not None:
            raise TrainError(
                f"task {spec.name!r}: label {label} is outside the head's {spec.channels} classes "
                f"(0..{spec.channels - 1}, or {spec.ignore_label} = ignore)"
            )
    return [t.to(device, non_blocking=True) for t in listed]
