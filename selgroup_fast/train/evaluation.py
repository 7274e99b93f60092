"""The evaluation: each task's metric and mean loss over the validation batches (kept in memory when small)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from ..tasks import TASKS, Task, TaskSpec
from .batches import as_list, checked_targets

#: ``loss_fn(outputs, targets, tasks) -> K scalar losses`` (outputs and targets in task order).
LossFn = Callable[..., Sequence[torch.Tensor]]

#: The most memory the validation batches may take to be kept between evaluations.
VAL_CACHE_BYTES = 512 * 2**20


class LossMetric:
    """For tasks without a metric in selgroup_fast.metrics (a user's own task): the mean validation loss."""

    primary = "loss"
    higher_is_better: ClassVar[dict[str, bool]] = {"loss": False}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def add_loss(self, loss: float) -> None:
        self.total += loss
        self.count += 1

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pass  # fed through add_loss

    def compute(self) -> dict[str, float]:
        return {"loss": self.total / max(self.count, 1)}


def make_metric(spec: TaskSpec) -> Any:
    """The task's metric; a user's spec named like a benchmark task gets that task's metric."""
    if isinstance(spec, Task):
        return spec.new_metric()
    return TASKS[spec.name].new_metric() if spec.name in TASKS else LossMetric()


def metric_directions(specs: list[TaskSpec]) -> dict[str, Any]:
    """``higher_is_better`` (``{task: {metric: bool}}``) and ``primary`` (``{task: metric}``) of the tasks' metrics."""
    metrics = {spec.name: make_metric(spec) for spec in specs}
    return {
        "higher_is_better": {name: dict(metric.higher_is_better) for name, metric in metrics.items()},
        "primary": {name: metric.primary for name, metric in metrics.items()},
    }


def _computed(task: str, metric: Any) -> dict[str, float]:
    """The metric's values; NaN for its primary metric when the evaluation had nothing to score."""
    try:
        return {key: float(value) for key, value in metric.compute().items()}
    except ValueError as error:  # e.g. no valid pixel in the evaluated batches
        print(f"warning: task {task}: {error}", file=sys.stderr)
        return {metric.primary: float("nan")}


class Evaluator:
    """Scores a model on the first ``eval_batches`` validation batches: each task's metrics and mean loss."""

    def __init__(
        self,
        specs: list[TaskSpec],
        loader: DataLoader,
        eval_batches: int | None,
        loss_fn: LossFn,
        device: torch.device,
        autocast: Any,
    ) -> None:
        self.specs, self.loader, self.eval_batches = specs, loader, eval_batches
        self.loss_fn, self.device, self.autocast = loss_fn, device, autocast
        self._cache: list[Any] | None = None

    def _batches(self) -> Iterator[Any]:
        """The validation batches; kept in memory after the first evaluation when they take under
        VAL_CACHE_BYTES (the fixed validation set is then rendered or read once, not at every evaluation)."""
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[Any] | None = []
        size = 0
        for batch in itertools.islice(self.loader, self.eval_batches):
            if kept is not None:
                images, targets = batch
                size += images.nbytes + sum(t.nbytes for t in as_list(targets, self.specs))
                if size <= VAL_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self._cache = kept

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """``({task: {metric: value}}, {task: mean validation loss})``; the model is left in training mode."""
        model.eval()
        names = [spec.name for spec in self.specs]
        metrics = [make_metric(spec) for spec in self.specs]
        loss_sums = [0.0] * len(self.specs)
        batches = 0
        for images, targets in self._batches():
            images = images.to(self.device, non_blocking=True)
            targets = checked_targets(targets, self.specs, self.device)
            with self.autocast:
                outputs = model(images)
                losses = self.loss_fn(outputs, targets, self.specs)
            for k, (metric, output, target, loss) in enumerate(zip(metrics, outputs, targets, losses, strict=False)):
                metric.update(output.float(), target)
                loss_value = float(loss)
                loss_sums[k] += loss_value
                if isinstance(metric, LossMetric):
                    metric.add_loss(loss_value)
            batches += 1
        model.train()
        computed = {name: _computed(name, metric) for name, metric in zip(names, metrics, strict=False)}
        return computed, {name: total / max(batches, 1) for name, total in zip(names, loss_sums, strict=False)}
