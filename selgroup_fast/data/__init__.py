"""Multi-task datasets for the trainer: the built-in rendered ``scenes`` and NYUD-v2 from disk.

Every dataset yields ``(image, targets)``: ``image`` float32 ``[3, S, S]`` normalised with the
ImageNet mean and standard deviation, ``targets`` a dict from task name to a tensor:
int64 ``[S, S]`` labels for segmentation-kind tasks (255 = ignore) or float32 ``[C, S, S]``
for regression-kind tasks (NaN = invalid pixel), as the tasks of ``selgroup_fast.tasks``
are defined. ``docs/datasets.md`` describes the datasets and their targets.

>>> from selgroup_fast.data import build_dataset
>>> data = build_dataset("scenes", "train", ["semseg", "depth"], img_size=16)
>>> image, targets = data[0]
>>> tuple(image.shape), tuple(targets["semseg"].shape), tuple(targets["depth"].shape)
((3, 16, 16), (16, 16), (1, 16, 16))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from .common import IMAGENET_MEAN, IMAGENET_STD, DataError, check_common
from .nyud import NYUD_NPY_TASKS, NYUD_TASKS, NyudDataset, NyudNpyDataset
from .scenes_dataset import SCENES_CLASSES, SCENES_LENGTHS, ScenesDataset

DATASETS = ("scenes", "nyud", "nyud_npy")


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The task names dataset ``name`` provides.

    >>> dataset_tasks("nyud")
    ('semseg', 'depth', 'normals', 'edge')
    """
    if name == "scenes":
        from ..tasks import TASKS  # here: selgroup_fast.tasks imports this package's target functions

        return tuple(TASKS)  # the rooms render every task's target
    if name in ("nyud", "nyud_npy"):
        return NYUD_TASKS if name == "nyud" else NYUD_NPY_TASKS
    raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def dataset_classes(name: str) -> dict[str, int]:
    """The number of classes of each label-kind task of dataset ``name`` (a head needs at least as many).

    >>> dataset_classes("nyud"), dataset_classes("nyud_npy")
    ({'semseg': 40, 'edge': 2}, {'semseg': 13})
    """
    if name == "scenes":
        return dict(SCENES_CLASSES)
    if name in ("nyud", "nyud_npy"):
        return dict(NyudDataset.classes if name == "nyud" else NyudNpyDataset.classes)
    raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def build_dataset(
    name: str,
    split: str,
    tasks: Sequence[str],
    img_size: int,
    root: str | Path | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Dataset ``name``'s ``split`` ("train" or "val") with the targets of ``tasks`` at ``img_size`` pixels.

    ``scenes`` is rendered on the fly, deterministic from ``(seed, split, index)`` (``root`` unused);
    with ``cache_dir`` (default: the environment variable ``SELGROUP_SCENES_CACHE``, if set) each
    rendered item is also written there and read back by later epochs and runs.
    ``nyud`` and ``nyud_npy`` read NYUD-v2 under ``root`` (``seed`` and ``cache_dir`` unused). Raises
    :class:`DataError` (one line) for an unknown dataset, split or task, a bad size, or a
    malformed data root.
    """
    provided = dataset_tasks(name)
    tasks = check_common(name, split, tasks, img_size, provided)
    if name == "scenes":
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        if cache_dir is None and os.environ.get("SELGROUP_SCENES_CACHE"):
            cache_dir = os.environ["SELGROUP_SCENES_CACHE"]
        return ScenesDataset(split, tasks, img_size, seed, None if cache_dir is None else Path(cache_dir))
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root (--data-root DIR)")
    dataset_class = NyudDataset if name == "nyud" else NyudNpyDataset
    return dataset_class(Path(root), split, tasks, img_size)


__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCENES_LENGTHS",
    "DataError",
    "ScenesDataset",
    "build_dataset",
    "dataset_classes",
    "dataset_tasks",
]
