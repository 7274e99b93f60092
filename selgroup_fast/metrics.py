"""Evaluation metrics of the paper's tasks, and the multi-task performance Δm.

The metrics follow the paper's evaluation code (``evaluation/eval_*.py``, inherited from
Multi-Task-Learning-PyTorch / InvPT): counts and sums are pooled over every valid pixel of
the evaluation set before the ratio is taken. Percent-valued metrics (IoU, F-measures,
accuracies) are reported in percent, as the paper's tables print them. ``docs/datasets.md``
lists every metric, the peer code each one equals, and where it departs from that code.

A metric is an accumulator fed with the model's raw output and the target batch::

    >>> import torch
    >>> metric = make_metric("semseg")
    >>> logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # [B=1, C=2, 1, 2]: predicts 0, 1
    >>> metric.update(logits, torch.tensor([[[0, 0]]]))
    >>> metric.compute()["mIoU"], metric.primary, metric.higher_is_better["mIoU"]
    (25.0, 'mIoU', True)

``delta_m`` (``docs/algorithm.md §Δm``) compares each task's primary metric with a
single-task baseline; higher is better::

    >>> delta_m({"depth": {"rmse": 0.75}}, {"depth": {"rmse": 1.0}}, {"depth": {"rmse": False}}, {"depth": "rmse"})
    25.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .data.common import IGNORE_LABEL as IGNORE_INDEX

# Saliency maxF: the thresholds and F-measure weight of the paper's SaliencyMeter, its thresholds
# made as it makes them (torch.arange(0.05, 1, 0.05) in float32: the 12th is 0.6 less one ulp).
SALIENCY_THRESHOLDS = tuple(torch.arange(0.05, 1, 0.05).tolist())
SALIENCY_BETA_SQUARED = 0.3
# Saliency mIoU: Multi-Task-Learning-PyTorch's SaliencyMeter thresholds, numpy.linspace(0.2, 0.9, 15).
SALIENCY_IOU_THRESHOLDS = tuple(np.linspace(0.2, 0.9, 15).tolist())
# What the paper's DepthMeter puts in place of a prediction <= 0 before every error.
DEPTH_PREDICTION_FLOOR = 1e-9
# Edge stand-in thresholds: the 99 of the BSDS/seism benchmarks' default sweep.
EDGE_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(1, 100))
NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
# The median angular error comes from a histogram of this bin width (degrees).
NORMAL_MEDIAN_BIN_DEG = 0.01


def _check_batch(task: str, output: torch.Tensor, target: torch.Tensor, label_target: bool) -> None:
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or not output.is_floating_point():
        raise ValueError(f"{task}: output must be a float tensor [B, C, H, W], got {_describe(output)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{task}: target must be a tensor, got {type(target).__name__}")
    if label_target:
        if target.dim() != 3 or target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"{task}: target must be integer labels [B, H, W], got {_describe(target)}")
        spatial = tuple(target.shape)
    else:
        if target.dim() != 4 or not target.is_floating_point():
            raise ValueError(f"{task}: target must be a float tensor [B, C, H, W], got {_describe(target)}")
        spatial = (target.shape[0], *target.shape[2:])
    if (output.shape[0], *output.shape[2:]) != spatial:
        raise ValueError(
            f"{task}: output {tuple(output.shape)} and target {tuple(target.shape)} differ in batch or spatial size"
        )
    if target.device != output.device:
        raise ValueError(f"{task}: output on {output.device} but target on {target.device}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class TaskMetric:
    """Accumulates one task's evaluation over batches.

    ``update(output, target)`` takes the model's raw output ``[B, C, H, W]`` (logits for
    segmentation kinds) and the target batch (int64 ``[B, H, W]`` with 255 = ignore, or
    float ``[B, C, H, W]`` with NaN = invalid); ``compute()`` returns ``{metric: value}``;
    ``higher_is_better`` gives each metric's direction and ``primary`` the metric Δm uses.
    """

    higher_is_better: ClassVar[dict[str, bool]]
    primary: ClassVar[str]

    def __init__(self, task: str) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        raise NotImplementedError

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metrics over every batch since the last reset."""
        raise NotImplementedError

    def _empty(self) -> ValueError:
        return ValueError(f"{self.task}: no valid pixel seen; nothing to compute")


class SegmentationMetric(TaskMetric):
    """Class labelling (semseg, human_parts): mean IoU and pixel accuracy over non-ignored pixels.

    The confusion counts are pooled over the dataset, as the paper's ``SemsegMeter``. The mean
    IoU averages the classes that occur in the ground truth or the predictions; the paper's
    code averages all classes of the head, the same wherever every class occurs in the
    evaluation set (as in NYUD-v2's and PASCAL-Context's), and here a head with more classes
    than the data has (``scenes`` in a 40-way head) is not capped.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"mIoU": True, "pixel_acc": True}
    primary = "mIoU"

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None  # [C, C]: target class x predicted class

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=True)
        classes = output.shape[1]
        target = target.long()
        valid = target != IGNORE_INDEX
        labels = target[valid]
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"{self.task}: target labels must be in [0, {classes}) or {IGNORE_INDEX}")
        predicted = output.argmax(1)[valid]
        counts = torch.bincount(labels * classes + predicted, minlength=classes * classes).view(classes, classes)
        if self.confusion is None:
            self.confusion = torch.zeros(classes, classes, dtype=torch.int64, device=output.device)
        elif self.confusion.shape[0] != classes:
            raise ValueError(f"{self.task}: output has {classes} classes, earlier batches {self.confusion.shape[0]}")
        self.confusion += counts

    def compute(self) -> dict[str, float]:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            raise self._empty()
        confusion = self.confusion.double().cpu()
        true_positive = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        present = union > 0
        iou = true_positive[present] / union[present]
        return {"mIoU": 100 * iou.mean().item(), "pixel_acc": 100 * (true_positive.sum() / confusion.sum()).item()}


class DepthMetric(TaskMetric):
    """Depth: RMSE, mean absolute relative error and log-RMSE, pooled over valid pixels.

    Valid pixels have a finite, positive ground truth. A prediction <= 0 counts as
    ``DEPTH_PREDICTION_FLOOR`` (1e-9) in every error, as in the paper's evaluation (its
    ``get_output`` clamps the depth at 0, its ``DepthMeter`` sets <= 0 to 1e-9); a NaN
    prediction stays NaN. LibMTL's ``DepthMetric`` uses the raw prediction instead.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"rmse": False, "abs_rel": False, "log_rmse": False}
    primary = "rmse"

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # pixels, squared error, relative error, squared log error

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=False)
        if output.shape[1] != 1 or target.shape[1] != 1:
            raise ValueError(f"{self.task}: depth output and target need 1 channel")
        valid = torch.isfinite(target) & (target > 0)
        truth, predicted = target[valid].double(), output[valid].double()
        predicted = torch.where(predicted <= 0, DEPTH_PREDICTION_FLOOR, predicted)
        error = predicted - truth
        log_error = torch.log(predicted) - torch.log(truth)
        batch = torch.stack(
            [
                torch.tensor(float(truth.numel()), dtype=torch.float64, device=truth.device),
                (error * error).sum(),
                (error.abs() / truth).sum(),
                (log_error * log_error).sum(),
            ]
        )
        self.sums += batch.cpu()

    def compute(self) -> dict[str, float]:
        pixels = self.sums[0].item()
        if pixels == 0:
            raise self._empty()
        return {
            "rmse": math.sqrt(self.sums[1].item() / pixels),
            "abs_rel": self.sums[2].item() / pixels,
            "log_rmse": math.sqrt(self.sums[3].item() / pixels),
        }


def angular_error_deg(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between vectors along dim 1, ``2 atan2(|p - g|, |p + g|)`` of the unit vectors.

    A zero prediction is 90 degrees from every truth (the paper's ``normalize_tensor`` maps it to 0).
    """

    def unit(x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))

    p, g = unit(predicted), unit(truth)
    return torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))


class NormalsMetric(TaskMetric):
    """Surface normals: mean, median and RMS angular error and % of pixels within 11.25, 22.5, 30 degrees.

    Valid pixels have a finite, non-zero ground-truth normal. The median is read from a
    histogram of ``NORMAL_MEDIAN_BIN_DEG``-wide bins (the bin's centre), so that the pooled
    median over a large evaluation set needs no list of every pixel's error.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "mean": False,
        "median": False,
        "rmse": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    primary = "mean"
    _bins = round(180 / NORMAL_MEDIAN_BIN_DEG)

    def reset(self) -> None:
        self.sums = torch.zeros(3 + len(NORMAL_THRESHOLDS_DEG), dtype=torch.float64)  # n, sum, sum sq, within...
        self.histogram = torch.zeros(self._bins, dtype=torch.int64)

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=False)
        if output.shape[1] != 3 or target.shape[1] != 3:
            raise ValueError(f"{self.task}: normals output and target need 3 channels")
        valid = torch.isfinite(target).all(1) & (torch.nan_to_num(target).abs().sum(1) > 0)
        angle = angular_error_deg(output.double(), torch.nan_to_num(target).double())[valid]
        within = [(angle < limit).sum() for limit in NORMAL_THRESHOLDS_DEG]
        batch = torch.stack(
            [
                torch.tensor(float(angle.numel()), dtype=torch.float64, device=angle.device),
                angle.sum(),
                (angle * angle).sum(),
                *(w.double() for w in within),
            ]
        )
        self.sums += batch.cpu()
        index = (angle / NORMAL_MEDIAN_BIN_DEG).long().clamp_(0, self._bins - 1)
        self.histogram += torch.bincount(index, minlength=self._bins).cpu()

    def compute(self) -> dict[str, float]:
        pixels = self.sums[0].item()
        if pixels == 0:
            raise self._empty()
        # The median is the mean of the two middle errors (one when the count is odd), as numpy's.
        count = int(pixels)
        middle = torch.tensor([(count - 1) // 2 + 1, count // 2 + 1], dtype=torch.int64)
        middle_bins = torch.searchsorted(self.histogram.cumsum(0), middle).double()
        result = {
            "mean": self.sums[1].item() / pixels,
            "median": (middle_bins.mean().item() + 0.5) * NORMAL_MEDIAN_BIN_DEG,
            "rmse": math.sqrt(self.sums[2].item() / pixels),
        }
        for k, limit in enumerate(NORMAL_THRESHOLDS_DEG):
            result[f"within_{limit:g}"] = 100 * self.sums[3 + k].item() / pixels
        return result


def _foreground_probability(task: str, output: torch.Tensor) -> torch.Tensor:
    """P(class 1): softmax over a 2-class head, sigmoid of a 1-channel head."""
    if output.shape[1] == 2:
        return F.softmax(output.float(), dim=1)[:, 1]
    if output.shape[1] == 1:
        return torch.sigmoid(output.float()[:, 0])
    raise ValueError(f"{task}: output needs 1 (logit) or 2 (class logits) channels, got {output.shape[1]}")


def _binary_target(task: str, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != IGNORE_INDEX
    labels = target[valid]
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{task}: target labels must be 0, 1 or {IGNORE_INDEX}")
    return target == 1, valid


class SaliencyMetric(TaskMetric):
    """Saliency: maxF and mIoU of the thresholded foreground probability.

    maxF is the paper's ``SaliencyMeter`` (InvPT's): at each of ``SALIENCY_THRESHOLDS``
    (probability >= threshold), true, predicted and actual positives pooled over the set's
    non-ignored pixels, F_beta with beta^2 = 0.3, the maximum over thresholds. The paper's code
    applies a sigmoid to the softmax probability a second time before thresholding; this
    follows the meter's intent (one probability), not its published numbers.
    mIoU is Multi-Task-Learning-PyTorch's ``SaliencyMeter``: at each of
    ``SALIENCY_IOU_THRESHOLDS`` (probability > threshold), each image's Jaccard index (1 when
    prediction and truth are both empty), averaged over images, the maximum over thresholds.
    Pixels labelled 255 are left out, as its ``jaccard``'s ``void_pixels``; its meter passes
    none, so there a 255 counts as salient.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"maxF": True, "mIoU": True}
    primary = "maxF"

    def reset(self) -> None:
        self.positives = torch.zeros(3, len(SALIENCY_THRESHOLDS), dtype=torch.float64)  # true, predicted, actual
        self.jaccard_sum = torch.zeros(len(SALIENCY_IOU_THRESHOLDS), dtype=torch.float64)
        self.images = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=True)
        probability = _foreground_probability(self.task, output)
        truth, valid = _binary_target(self.task, target)
        truth = truth & valid
        positives = []
        for threshold in SALIENCY_THRESHOLDS:
            predicted = (probability >= threshold) & valid
            positives.append(torch.stack([(predicted & truth).sum(), predicted.sum(), truth.sum()]))
        jaccard_sums = []
        for threshold in SALIENCY_IOU_THRESHOLDS:
            predicted = (probability > threshold) & valid
            intersection = (predicted & truth).flatten(1).sum(1).double()
            union = (predicted | truth).flatten(1).sum(1).double()
            jaccard_sums.append(torch.where(union > 0, intersection / union.clamp_min(1), 1.0).sum())
        self.positives += torch.stack(positives, 1).double().cpu()
        self.jaccard_sum += torch.stack(jaccard_sums).cpu()
        self.images += output.shape[0]

    def compute(self) -> dict[str, float]:
        if self.images == 0:
            raise self._empty()
        true_positive, predicted, actual = self.positives
        precision = true_positive / predicted
        recall = true_positive / actual
        beta2 = SALIENCY_BETA_SQUARED
        f_measure = torch.nan_to_num((1 + beta2) * precision * recall / (beta2 * precision + recall), nan=0.0)
        return {"maxF": 100 * f_measure.max().item(), "mIoU": 100 * (self.jaccard_sum / self.images).max().item()}


class EdgeMetric(TaskMetric):
    """Edges: ``odsF_standin``, a stand-in for the paper's odsF.

    The paper's odsF comes from the seism MATLAB toolbox (thinned predictions matched to the
    ground truth within a distance tolerance). The stand-in keeps its "optimal dataset
    scale" part: precision and recall of the thresholded edge probability are pooled over
    the whole set at each of ``EDGE_THRESHOLDS``, and the best F1 is reported; pixels match
    exactly (no thinning, no distance tolerance), so it is lower than the real odsF.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"odsF_standin": True}
    primary = "odsF_standin"

    def reset(self) -> None:
        self.counts = torch.zeros(2, len(EDGE_THRESHOLDS), dtype=torch.float64)  # true positives, predicted
        self.actual = 0.0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=True)
        probability = _foreground_probability(self.task, output)
        truth, valid = _binary_target(self.task, target)
        probability, truth = probability[valid], truth[valid]
        positive_probability = probability[truth]
        thresholds = torch.tensor(EDGE_THRESHOLDS, dtype=probability.dtype, device=probability.device)
        # Counts at every threshold: sort once, count how many lie at or above each threshold.
        all_sorted, _ = probability.sort()
        positive_sorted, _ = positive_probability.sort()
        predicted = all_sorted.numel() - torch.searchsorted(all_sorted, thresholds)
        true_positive = positive_sorted.numel() - torch.searchsorted(positive_sorted, thresholds)
        self.counts += torch.stack([true_positive, predicted]).double().cpu()
        self.actual += float(positive_probability.numel())

    def compute(self) -> dict[str, float]:
        if self.actual == 0 and float(self.counts[1].max()) == 0:
            raise self._empty()
        true_positive, predicted = self.counts
        precision = true_positive / predicted
        recall = true_positive / self.actual
        f_measure = torch.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
        return {"odsF_standin": 100 * f_measure.max().item()}


class L1Metric(TaskMetric):
    """Taskonomy tasks: mean absolute error over valid (finite) target elements, as the paper reports."""

    higher_is_better: ClassVar[dict[str, bool]] = {"l1": False}
    primary = "l1"

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)  # elements, absolute error

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        _check_batch(self.task, output, target, label_target=False)
        if output.shape[1] != target.shape[1]:
            raise ValueError(f"{self.task}: output has {output.shape[1]} channels, target {target.shape[1]}")
        valid = torch.isfinite(target)
        error = (output[valid].double() - target[valid].double()).abs().sum()
        self.sums += torch.stack([torch.tensor(float(valid.sum()), dtype=torch.float64), error.cpu()])

    def compute(self) -> dict[str, float]:
        if self.sums[0].item() == 0:
            raise self._empty()
        return {"l1": self.sums[1].item() / self.sums[0].item()}


def make_metric(task: str) -> TaskMetric:
    """A fresh accumulator for ``task`` (a task name of ``selgroup_fast.tasks.TASKS``, whose metric it is)."""
    from .tasks import TASKS  # here: selgroup_fast.tasks imports this module's metrics

    if task not in TASKS:
        raise ValueError(f"no metric for task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task].new_metric()


def _relative_change(task: str, name: str, value: float, base: float, higher: bool) -> float:
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        raise ValueError(f"Δm: task {task!r} metric {name!r}: value {value} against baseline {base} is undefined")
    return (value - base) / base if higher else (base - value) / base


def _check_tasks(metrics: Mapping, baseline: Mapping, higher_is_better: Mapping) -> None:
    if not metrics:
        raise ValueError("Δm: no task in metrics")
    for task in metrics:
        if task not in baseline:
            raise ValueError(f"Δm: task {task!r} has no baseline; baseline tasks: {', '.join(baseline) or 'none'}")
        if task not in higher_is_better:
            raise ValueError(f"Δm: task {task!r} has no higher_is_better entry")


def _metric(table: Mapping, task: str, name: str, what: str) -> float:
    if name not in table[task]:
        raise ValueError(f"Δm: {what} of task {task!r} has no metric {name!r}")
    return float(table[task][name])


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    primary: Mapping[str, str],
) -> float:
    """Δm in percent over each task's primary metric (Maninis et al. 2019; ``docs/algorithm.md §Δm``).

    ``Δm = (1/K) Σ_k (−1)^{l_k} (M_k − M_{b,k}) / M_{b,k} × 100`` with ``l_k = 1`` when lower is
    better: the mean relative improvement over the single-task baseline; higher is better.
    ``metrics`` and ``baseline`` map task -> metric -> value; every task of ``metrics`` needs a baseline.

    >>> delta_m({"a": {"m": 30.0}, "b": {"e": 1.5}}, {"a": {"m": 20.0}, "b": {"e": 1.0}},
    ...         {"a": {"m": True}, "b": {"e": False}}, {"a": "m", "b": "e"})
    0.0
    """
    _check_tasks(metrics, baseline, higher_is_better)
    total = 0.0
    for task in metrics:
        if task not in primary:
            raise ValueError(f"Δm: task {task!r} has no primary metric")
        name = primary[task]
        value, base = _metric(metrics, task, name, "metrics"), _metric(baseline, task, name, "baseline")
        total += _relative_change(task, name, value, base, bool(higher_is_better[task][name]))
    return 100 * total / len(metrics)


def delta_m_all(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    """Δm in percent over every metric, LibMTL's convention: each task's metrics averaged, then the tasks.

    ``100 × (1/K) Σ_k (1/M_k) Σ_m (−1)^{l_{k,m}} (M_{k,m} − B_{k,m}) / B_{k,m}`` over the metrics
    listed in ``higher_is_better[task]``; higher is better. Not nash-mtl's or FAMO's ``delta_fn``,
    which pools every (task, metric) pair and is lower-is-better (``docs/algorithm.md §Δm``).

    >>> delta_m_all({"a": {"m": 30.0, "e": 2.0}}, {"a": {"m": 20.0, "e": 1.0}}, {"a": {"m": True, "e": False}})
    -25.0
    """
    _check_tasks(metrics, baseline, higher_is_better)
    total = 0.0
    for task in metrics:
        names = list(higher_is_better[task])
        if not names:
            raise ValueError(f"Δm: task {task!r} lists no metric in higher_is_better")
        changes = [
            _relative_change(
                task,
                name,
                _metric(metrics, task, name, "metrics"),
                _metric(baseline, task, name, "baseline"),
                bool(higher_is_better[task][name]),
            )
            for name in names
        ]
        total += sum(changes) / len(changes)
    return 100 * total / len(metrics)
