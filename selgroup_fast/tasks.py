"""The benchmark tasks: one :class:`Task` per task, and the presets as tuples of them.

A :class:`Task` is everything the library knows about one dense prediction task: its name,
its kind (``segmentation``: integer labels, cross-entropy; ``regression``: real-valued maps,
L1), its head's output channels (the classes of a segmentation task), its loss, its metric
(with each value's direction and the primary value Δm uses), the ignore label of its targets
and the function that renders its target from a ``scenes`` room. Adding a task is one
:class:`Task` in a preset below; adding a dataset's version of a task (another class count) is
one :func:`dataclasses.replace` of it. ``docs/datasets.md`` lists the presets.

>>> [(task.name, task.channels) for task in PRESETS["nyud"]]
[('semseg', 40), ('depth', 1), ('normals', 3), ('edge', 2)]
>>> PRESETS["pascal"][0].channels, PRESETS["nyud_npy"][0].channels, PRESETS["scenes"][0].channels
(21, 13, 11)
>>> TASKS["depth"].primary, TASKS["depth"].higher_is_better["rmse"], TASKS["depth"].ignore_label
('rmse', False, None)

:class:`TaskSpec` is the part a model and a loss need (name, kind, channels): what a user's own
tasks are given as (``fit(tasks=...)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .data import targets
from .data.common import IGNORE_LABEL
from .data.nyud import NYUD_CLASSES, NYUD_NPY_CLASSES
from .data.scenes import CLASS_NAMES, PART_NAMES, Render

TaskKind = Literal["segmentation", "regression"]
#: Classes of PASCAL-Context's semantic segmentation (20 object classes and background) in the paper.
PASCAL_CLASSES = 21


@dataclass(frozen=True)
class TaskSpec:
    """One dense prediction task as a model and its loss see it: name, kind and output channels.

    For ``segmentation`` tasks ``channels`` is the number of classes (cross-entropy against an
    integer label map, :data:`IGNORE_LABEL` pixels left out); for ``regression`` tasks it is the
    number of predicted channels (L1 against a real-valued map, NaN pixels left out).
    """

    name: str
    kind: TaskKind
    channels: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a task's name must be a non-empty string, got {self.name!r}")
        if self.kind not in get_args(TaskKind):
            raise ValueError(f"task {self.name!r}: kind must be segmentation or regression, got {self.kind!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"task {self.name!r}: channels must be a positive int, got {self.channels!r}")

    @property
    def ignore_label(self) -> int | None:
        """The target label no loss or metric counts (segmentation kinds); None for regression (NaN there)."""
        return IGNORE_LABEL if self.kind == "segmentation" else None

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss on one batch: the mean over the counted pixels, 0 when none counts (never NaN).

        Cross-entropy of ``output`` [B, C, H, W] logits against int64 labels [B, H, W] for
        segmentation, L1 against a [B, C, H, W] map for regression. Nothing is read on the host.
        """
        if self.kind == "segmentation":
            counted = (target != IGNORE_LABEL).sum().clamp(min=1)
            total = F.cross_entropy(output, target, ignore_index=IGNORE_LABEL, reduction="sum")
        else:
            valid = ~torch.isnan(target)
            counted = valid.sum().clamp(min=1)
            total = ((output - target.nan_to_num()).abs() * valid).sum()
        return total / counted

    def label_outside_head(self, target: torch.Tensor) -> int | None:
        """A label of ``target`` that the head has no class for (neither ``0..channels-1`` nor the
        ignore label), or None. Reads the target on the host: check CPU batches, before the transfer."""
        if self.kind != "segmentation":
            return None
        outside = (target < 0) | ((target >= self.channels) & (target != IGNORE_LABEL))
        return int(target[outside][0]) if bool(outside.any()) else None


@dataclass(frozen=True)
class Task(TaskSpec):
    """A benchmark task: a :class:`TaskSpec` with its metric and its ``scenes`` target.

    ``metric`` is the :class:`selgroup_fast.metrics.TaskMetric` class that scores it (its
    ``higher_is_better`` and ``primary`` are the task's); ``target`` renders the task's target
    from a ``scenes`` room (:mod:`selgroup_fast.data.targets`): ``[S, S]`` int64 labels for
    segmentation, ``[channels, S, S]`` float32 for regression.
    """

    metric: type[metrics.TaskMetric]
    target: Callable[[Render], np.ndarray]

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Each metric value's direction."""
        return dict(self.metric.higher_is_better)

    @property
    def primary(self) -> str:
        """The metric value Δm uses."""
        return self.metric.primary

    def new_metric(self) -> metrics.TaskMetric:
        """A fresh accumulator of the task's metric."""
        return self.metric(self.name)


SEMSEG = Task("semseg", "segmentation", NYUD_CLASSES, metrics.SegmentationMetric, targets.semseg)
DEPTH = Task("depth", "regression", 1, metrics.DepthMetric, targets.depth)
NORMALS = Task("normals", "regression", 3, metrics.NormalsMetric, targets.normals)
EDGE = Task("edge", "segmentation", 2, metrics.EdgeMetric, targets.edge)
HUMAN_PARTS = Task("human_parts", "segmentation", len(PART_NAMES), metrics.SegmentationMetric, targets.human_parts)
SALIENCY = Task("sal", "segmentation", 2, metrics.SaliencyMetric, targets.sal)
# The paper's Taskonomy setup regresses all 11 tasks with L1 and reports their L1 errors.
TASKONOMY = tuple(
    Task(name, "regression", channels, metrics.L1Metric, target)
    for name, channels, target in (
        ("depth_euclidean", 1, targets.depth_euclidean),
        ("depth_zbuffer", 1, targets.depth),
        ("edge_occlusion", 1, targets.edge_occlusion),
        ("edge_texture", 1, targets.edge_texture),
        ("keypoints2d", 1, targets.keypoints2d),
        ("keypoints3d", 1, targets.keypoints3d),
        ("normal", 3, targets.normals),
        ("principal_curvature", 2, targets.principal_curvature),
        ("reshading", 1, targets.reshading),
        ("segment_unsup2d", 1, targets.segment_unsup2d),
        ("segment_unsup25d", 1, targets.segment_unsup25d),
    )
)


def _semseg(classes: int) -> Task:
    return dataclasses.replace(SEMSEG, channels=classes)


#: The task sets of the paper's benchmarks and of the datasets, each task with its own head: NYUD-v2
#: (40 classes), PASCAL-Context (21 classes, 7 human parts), Taskonomy's 11 tasks, NYUD-v2's ``.npy``
#: release (13 classes, no edges) and the built-in ``scenes`` data's own classes. A bare task name
#: given to ``selgroup-train --tasks`` is the task of the preset named like the dataset.
PRESETS: dict[str, tuple[Task, ...]] = {
    "nyud": (SEMSEG, DEPTH, NORMALS, EDGE),
    "pascal": (_semseg(PASCAL_CLASSES), HUMAN_PARTS, SALIENCY, NORMALS, EDGE),
    "taskonomy": TASKONOMY,
    "nyud_npy": (_semseg(NYUD_NPY_CLASSES), DEPTH, NORMALS),
    "scenes": (_semseg(len(CLASS_NAMES)), DEPTH, NORMALS, EDGE),
}


def _first_by_name(presets: dict[str, tuple[Task, ...]]) -> dict[str, Task]:
    by_name: dict[str, Task] = {}
    for preset in presets.values():
        for task in preset:
            by_name.setdefault(task.name, task)
    return by_name


#: Every task by name, as the first preset defines it (presets differ only in class counts).
TASKS = _first_by_name(PRESETS)


def task_losses(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], tasks: Sequence[TaskSpec]
) -> list[torch.Tensor]:
    """The K scalar losses, each task's :meth:`TaskSpec.loss` (outputs and targets in task order).

    >>> import torch
    >>> tasks = [TaskSpec("seg", "segmentation", 2), TaskSpec("depth", "regression", 1)]
    >>> outputs = [torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)]
    >>> targets = [torch.tensor([[[0, 255]]]), torch.tensor([[[[2.0, float("nan")]]]])]
    >>> [round(float(loss), 4) for loss in task_losses(outputs, targets, tasks)]
    [0.6931, 2.0]
    """
    return [spec.loss(output, target) for output, target, spec in zip(outputs, targets, tasks, strict=True)]


__all__ = ["IGNORE_LABEL", "PRESETS", "TASKS", "Task", "TaskKind", "TaskSpec", "task_losses"]
