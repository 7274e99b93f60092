"""The ``scenes`` dataset: one rendered room per index, all targets of the requested tasks."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import SPLITS, normalise_image
from .scenes import SPLIT_CODES, draw_scene, render
from .targets import TARGETS

# Fixed split lengths (the scenes are generated, so any length would do; these keep an
# evaluation pass over ``val`` short on a CPU).
SCENES_LENGTHS = {"train": 4000, "val": 500}
SCENES_TASKS = tuple(TARGETS)


class ScenesDataset(Dataset):
    """Rendered scenes, deterministic from ``(seed, split, index)``; see ``docs/datasets.md``.

    Arguments are checked by :func:`selgroup_fast.data.build_dataset`, the way to build one.
    """

    def __init__(self, split: str, tasks: tuple[str, ...], img_size: int, seed: int) -> None:
        assert split in SPLITS
        self.split, self.tasks, self.img_size, self.seed = split, tasks, img_size, seed

    def __len__(self) -> int:
        return SCENES_LENGTHS[self.split]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scenes")
        index %= len(self)
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        scene = render(draw_scene(rng), self.img_size, rng)
        targets = {task: torch.from_numpy(TARGETS[task](scene)) for task in self.tasks}
        return normalise_image(scene.image), targets
