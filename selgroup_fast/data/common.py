"""What every dataset shares: the error type, argument checks and image normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# timm's ViTs expect ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")
# Label of void pixels in segmentation-kind targets (the paper's ignore index).
IGNORE_LABEL = 255


class DataError(ValueError):
    """A dataset cannot be built: unknown name, split or task, bad size, or a malformed data root."""


def check_common(
    name: str, split: str, tasks: Sequence[str], img_size: int, provided: Sequence[str]
) -> tuple[str, ...]:
    """Checks the arguments every dataset takes; returns ``tasks`` as a tuple."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(tasks, str):
        raise DataError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    tasks = tuple(tasks)
    if not tasks:
        raise DataError("tasks must name at least one task")
    unknown = [task for task in tasks if task not in provided]
    if unknown:
        raise DataError(f"dataset {name!r} has no task {unknown[0]!r}; its tasks: {', '.join(provided)}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"tasks must be distinct, got {', '.join(tasks)}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise DataError(f"img_size must be an int >= 8, got {img_size!r}")
    return tasks


def normalise_image(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` RGB in [0, 1] -> float32 ``[3, H, W]`` normalised with the ImageNet statistics."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    chw = ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))
