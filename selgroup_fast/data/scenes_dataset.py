"""The ``scenes`` dataset: one rendered room per index, all targets of the requested tasks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import SPLITS, DataError, normalise_image
from .scenes import CLASS_NAMES, PART_NAMES, SPLIT_CODES, draw_scene, render

# Fixed split lengths (the scenes are generated, so any length would do; these keep an
# evaluation pass over ``val`` short on a CPU).
SCENES_LENGTHS = {"train": 4000, "val": 500}
# The number of classes of each label-kind task of the rendered rooms.
SCENES_CLASSES = {"semseg": len(CLASS_NAMES), "human_parts": len(PART_NAMES), "sal": 2, "edge": 2}
# Part of the cache folder's name: bump it whenever the rendered output changes, so that
# caches of an older renderer are not read.
RENDER_VERSION = 1


class ScenesDataset(Dataset):
    """Rendered scenes, deterministic from ``(seed, split, index)``; see ``docs/datasets.md``.

    Arguments are checked by :func:`selgroup_fast.data.build_dataset`, the way to build one.
    """

    def __init__(
        self, split: str, tasks: tuple[str, ...], img_size: int, seed: int, cache_dir: Path | None = None
    ) -> None:
        assert split in SPLITS
        from ..tasks import TASKS  # here: selgroup_fast.tasks imports this package's target functions

        self.split, self.tasks, self.img_size, self.seed = split, tasks, img_size, seed
        self.renderers = [TASKS[task].target for task in tasks]
        self.cache: Path | None = None
        if cache_dir is not None:
            name = f"scenes-v{RENDER_VERSION}-seed{seed}-{split}-{img_size}px-{'+'.join(sorted(tasks))}"
            self.cache = Path(cache_dir) / name
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DataError(f"scenes: cannot create the cache folder {self.cache}: {error}") from None

    def __len__(self) -> int:
        return SCENES_LENGTHS[self.split]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scenes")
        index %= len(self)
        cached = self._read_cache(index)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        scene = render(draw_scene(rng), self.img_size, rng)
        targets = {
            task: torch.from_numpy(target(scene)) for task, target in zip(self.tasks, self.renderers, strict=True)
        }
        image = normalise_image(scene.image)
        self._write_cache(index, image, targets)
        return image, targets

    def _read_cache(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if self.cache is None:
            return None
        try:
            with np.load(self.cache / f"{index}.npz", allow_pickle=False) as arrays:
                image = torch.from_numpy(arrays["image"])
                targets = {task: torch.from_numpy(arrays[task]) for task in self.tasks}
        except (OSError, KeyError, ValueError, EOFError):  # absent or incomplete: render it again
            return None
        return image, targets

    def _write_cache(self, index: int, image: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        if self.cache is None:
            return
        # A temporary file renamed into place: readers (other workers, other runs) never see half a file.
        temporary = self.cache / f".{index}.{os.getpid()}.npz"
        arrays = {"image": image.numpy()} | {task: target.numpy() for task, target in targets.items()}
        np.savez(temporary, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        os.replace(temporary, self.cache / f"{index}.npz")
