"""A whole split in memory: each item rendered once, straight into one tensor per field for the split.

The trainer's ``--data-cache`` (``docs/training.md``, "The data path"): a DataLoader worker renders
an item into tensors the training process allocated in shared memory and sends back only its index;
the training process assembles a batch with one ``index_select`` per field. No tensor crosses
between the processes per batch, and later epochs read the cache without rendering.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from .common import DataError

#: Labels (int64 targets) are stored as uint8: every label of the built-in datasets (the ignore
#: label 255 included) fits, and a batch reads them back as int64, bitwise the dataset's own.
LABEL_STORAGE = torch.uint8
LABEL_RANGE = (0, 255)


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    return LABEL_STORAGE if dtype == torch.int64 else dtype


def item_fields(dataset: Dataset, index: int) -> dict[str, torch.Tensor]:
    """Item ``index`` of a Dataset of ``(image, targets dict)`` as one dict: ``image`` and each task's target."""
    image, targets = dataset[index]
    return {"image": image, **targets}


def split_cache_bytes(first: dict[str, torch.Tensor], count: int) -> int:
    """Bytes a :class:`SplitCache` of ``count`` items like ``first`` (:func:`item_fields`) takes.

    >>> from selgroup_fast.data import build_dataset
    >>> data = build_dataset("scenes", "train", ["semseg", "depth", "normals", "edge"], img_size=32)
    >>> split_cache_bytes(item_fields(data, 0), len(data)) // 2**20  # MiB: 4000 × (7 float32 + 2 uint8) × 32²
    117
    """
    return count * sum(t.numel() * _storage_dtype(t.dtype).itemsize for t in first.values())


def shared_memory_room() -> int | None:
    """Free bytes of ``/dev/shm`` (where torch's shared tensors live on Linux), None where it is absent."""
    try:
        stats = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # not Linux: no such folder, or no statvfs
        return None
    return stats.f_bavail * stats.f_frsize


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype)
    # Straight in shared memory (as the DataLoader's collate allocates): share_memory_() would
    # allocate the tensor twice and copy it, a third of a second more at 117 MiB.
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class SplitCache(Dataset):
    """Every item of ``dataset`` (a Dataset of ``(image, targets dict)``) in one tensor per field,
    an item filled the first time it is asked for.

    Index ``i`` of this Dataset renders item ``i`` into the cache unless it is there already and
    returns ``i``: a DataLoader over it with ``collate_fn=list`` fills the cache in its workers and
    sends back a batch's indices only; :meth:`gather` then assembles the batch. With ``shared`` the
    tensors live in shared memory, so that the training process sees what its workers wrote (a
    worker returns an index only after writing the item). Labels are stored as uint8 (see
    :data:`LABEL_STORAGE`) and gathered as int64. ``first``: item 0's :func:`item_fields`, when
    already read (the cache starts with it).

    >>> from selgroup_fast.data import build_dataset
    >>> data = build_dataset("scenes", "train", ["semseg", "depth"], img_size=16)
    >>> cache = SplitCache(data, shared=False)
    >>> cache[5], cache[0]  # renders scene 5 into the cache; scene 0 is there from the start
    (5, 0)
    >>> images, targets = cache.gather([5, 0])
    >>> image, labels = data[5][0], data[5][1]["semseg"]
    >>> torch.equal(images[0], image), torch.equal(targets["semseg"][0], labels), targets["semseg"].dtype
    (True, True, torch.int64)
    """

    def __init__(self, dataset: Dataset, shared: bool, first: dict[str, torch.Tensor] | None = None) -> None:
        self.dataset = dataset
        count = len(dataset)  # type: ignore[arg-type]  # a map-style Dataset has __len__
        first = item_fields(dataset, 0) if first is None else first  # item 0 tells the fields' shapes
        self.dtypes = {name: t.dtype for name, t in first.items()}
        self.fields = {name: _empty((count, *t.shape), _storage_dtype(t.dtype), shared) for name, t in first.items()}
        self.filled = _empty((count,), torch.bool, shared).fill_(False)
        self._store(0, first)

    def __len__(self) -> int:
        return len(self.filled)

    def __getitem__(self, index: int) -> int:
        if not self.filled[index]:
            self._store(index, item_fields(self.dataset, index))
        return index

    @property
    def complete(self) -> bool:
        """Whether every item is in the cache."""
        return bool(self.filled.all())

    def _store(self, index: int, fields: dict[str, torch.Tensor]) -> None:
        for name, value in fields.items():
            if value.dtype == torch.int64 and value.numel():
                low, high = int(value.min()), int(value.max())
                if low < LABEL_RANGE[0] or high > LABEL_RANGE[1]:
                    raise DataError(
                        f"item {index}: {name!r} has label {low if low < LABEL_RANGE[0] else high}, outside the "
                        f"split cache's {LABEL_RANGE[0]}..{LABEL_RANGE[1]} (train without the cache)"
                    )
            self.fields[name][index] = value
        self.filled[index] = True  # last: the item is complete before anyone reads it as filled

    def gather(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch of items ``indices`` (all filled): ``(images, targets)``, as the DataLoader collates them."""
        rows = torch.tensor(indices, dtype=torch.int64)
        fields: dict[str, Any] = {
            name: stored.index_select(0, rows).to(self.dtypes[name]) for name, stored in self.fields.items()
        }
        images = fields.pop("image")
        return images, fields
