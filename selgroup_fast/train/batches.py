"""The training batches: a resumable shuffled shard per rank, endless from a position, targets checked;
the built-in ``scenes`` split cached in memory (``--data-cache``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from ..data.scenes_dataset import ScenesDataset
from ..data.split_cache import SplitCache, item_fields, shared_memory_room, split_cache_bytes
from ..tasks import TaskSpec
from .config import TrainConfig, TrainError

#: The largest split cache ``--data-cache auto`` allocates, per training process (``on``: any size).
AUTO_CACHE_LIMIT = 2**30


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
    DataLoader is replayed up to the position. The built-in ``scenes`` split goes through a
    :class:`~selgroup_fast.data.split_cache.SplitCache` when :func:`choose_split_cache` says so
    (:attr:`cache_note` says what was chosen): the same batches, without a per-batch transfer.
    """

    def __init__(self, data: Any, config: TrainConfig, world_size: int, rank: int, device: torch.device) -> None:
        self.epoch = 0
        self.batch_in_epoch = 0
        self._batch_size = config.batch_size
        self.sampler: ResumableSampler | None = None
        self._pin = device.type == "cuda"
        self.cache, self.cache_note = choose_split_cache(data, config)
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
            data if self.cache is None else self.cache,
            batch_size=config.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=config.workers or 0,
            # the cache's workers send back a list of indices; the batch is gathered here
            collate_fn=None if self.cache is None else list,
            pin_memory=self._pin and self.cache is None,
            # its own generator: creating an iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(config.seed),
        )

    def __iter__(self) -> Iterator[Any]:
        """The batches from the current position on; the position moves with every batch taken."""
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.skip = self.batch_in_epoch * self._batch_size
                if self.cache is not None and self.cache.complete:
                    # every item is in the cache: the batches are gathered here, no worker started
                    iterator = iter(BatchSampler(self.sampler, self._batch_size, drop_last=True))
                else:
                    iterator = iter(self.loader)
            else:
                iterator = iter(self.loader)
                for _ in range(self.batch_in_epoch):  # a user's DataLoader: replay up to the position
                    next(iterator)
            for batch in iterator:
                self.batch_in_epoch += 1
                yield batch if self.cache is None else self._gathered(batch)
            self.epoch += 1
            self.batch_in_epoch = 0

    def _gathered(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.cache is not None
        images, targets = self.cache.gather(indices)
        if self._pin:  # as the DataLoader's pin_memory: the copies to the GPU run asynchronously
            return images.pin_memory(), {name: target.pin_memory() for name, target in targets.items()}
        return images, targets


def choose_split_cache(data: Dataset | DataLoader, config: TrainConfig) -> tuple[SplitCache | None, str]:
    """The split cache ``--data-cache`` asks for (None: the DataLoader collates the dataset's items) and
    a line saying what was chosen and why.

    ``auto`` caches the built-in ``scenes`` split when it takes at most :data:`AUTO_CACHE_LIMIT`;
    ``on`` caches it at any size; both need room for it in shared memory when workers render into
    it, once per training process on the machine. ``on`` refuses (one :class:`TrainError` line) what ``auto`` leaves uncached: another dataset,
    or too little shared memory.
    """
    mode = config.data_cache
    if mode == "off":
        return None, "off (--data-cache off)"
    if not isinstance(data, ScenesDataset):
        if mode == "on":
            raise TrainError(
                "--data-cache on: only the built-in scenes dataset is cached (other data are read per batch)"
            )
        return None, "off (not the built-in scenes dataset)"
    first = item_fields(data, 0)
    needed = split_cache_bytes(first, len(data))
    size = _mib(needed)
    room = shared_memory_room() if config.workers else None
    # Each training process on this machine (torchrun's LOCAL_WORLD_SIZE) allocates its own cache in the one
    # /dev/shm, and none has written into it when the others look: the room must hold them all.
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if room is not None and needed * processes > room:
        total = size if processes == 1 else f"{processes} processes × {size}"
        if mode == "on":
            raise TrainError(f"--data-cache on: the split cache takes {total}, /dev/shm has {_mib(room)} free")
        return None, f"off ({total} > the {_mib(room)} free in /dev/shm)"
    if mode == "auto" and needed > AUTO_CACHE_LIMIT:
        return (
            None,
            f"off ({size} > the {_mib(AUTO_CACHE_LIMIT)} of --data-cache auto; --data-cache on caches it)",
        )
    where = "shared memory" if config.workers else "memory"
    return SplitCache(data, shared=bool(config.workers), first=first), f"on ({len(data)} items, {size} in {where})"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


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
