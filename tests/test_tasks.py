"""selgroup_fast.tasks: every preset's task has a loss, a metric, a target and a head; each preset's
tasks are its own (issue #19 item 2: ``--tasks nyud`` trained PASCAL's 21-class head); labels
outside a head's classes are refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_nyud import make_nyud
from train_helpers import TINY, TINY_ARGS, load_checkpoint

from selgroup_fast.data import build_dataset, dataset_classes
from selgroup_fast.data.scenes import CLASS_NAMES, draw_scene, render
from selgroup_fast.metrics import make_metric
from selgroup_fast.models import MultiTaskViT
from selgroup_fast.tasks import IGNORE_LABEL, PRESETS, TASKS, Task, TaskSpec
from selgroup_fast.train import TrainConfig, fit
from selgroup_fast.train.build import task_specs

SIZE = 16

#: Each task's primary metric and whether higher is better, as the paper's tables report them (Jeong &
#: Yoon, ICLR 2025, Tables 1-3: mIoU↑, RMSE↓, mean angle↓, odsF↑, maxF↑; Taskonomy: L1 error↓).
PAPER_PRIMARY = {
    "semseg": ("mIoU", True),
    "human_parts": ("mIoU", True),
    "sal": ("maxF", True),
    "depth": ("rmse", False),
    "normals": ("mean", False),
    "edge": ("odsF_standin", True),
    **{task.name: ("l1", False) for task in PRESETS["taskonomy"]},
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The trainer tests share the 2-core machine."""


@pytest.fixture(scope="module")
def room():
    rng = np.random.default_rng([0, 0, 1])
    return render(draw_scene(rng), SIZE, rng)


def _reference_loss(task: TaskSpec, output: torch.Tensor, target: torch.Tensor) -> float:
    """The loss re-derived in float64: the mean over counted pixels of -log softmax at the label, or |o - t|."""
    output = output.double()
    if task.kind == "segmentation":
        counted = target != IGNORE_LABEL
        log_p = torch.log_softmax(output, dim=1).gather(1, torch.where(counted, target, 0)[:, None])[:, 0]
        return float(-log_p[counted].mean())
    counted = ~torch.isnan(target)
    return float((output - target.double()).abs()[counted].mean())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_task_has_a_loss_a_metric_a_target_and_a_head(preset, room) -> None:
    tasks = PRESETS[preset]
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = MultiTaskViT(list(tasks), "test_vit", SIZE, 8)(torch.randn(1, 3, SIZE, SIZE))
    assert len(outputs) == len(tasks)
    for task, output in zip(tasks, outputs, strict=True):
        assert isinstance(task, Task), task
        # the head: one map of the task's channels
        assert output.shape == (1, task.channels, SIZE, SIZE), task
        # the target, rendered from a room: labels of the head's classes (or ignored), or a map of its channels
        target = torch.from_numpy(task.target(room))[None]
        if task.kind == "segmentation":
            assert target.dtype == torch.int64 and target.shape == (1, SIZE, SIZE), task
            assert task.ignore_label == IGNORE_LABEL
            labels = target[target != IGNORE_LABEL]
            assert labels.numel() and labels.min() >= 0 and labels.max() < task.channels, task
        else:
            assert target.dtype == torch.float32 and target.shape == (1, task.channels, SIZE, SIZE), task
            assert task.ignore_label is None
        # the loss, against its float64 re-derivation
        loss = task.loss(output, target)
        assert loss.shape == () and float(loss) == pytest.approx(_reference_loss(task, output, target), rel=1e-5)
        # the metric: the paper's primary value and direction, every value with a direction
        assert (task.primary, task.higher_is_better[task.primary]) == PAPER_PRIMARY[task.name], task
        metric = task.new_metric()
        metric.update(output, target)
        values = metric.compute()
        assert set(values) == set(task.higher_is_better) and math.isfinite(values[task.primary]), task


def test_a_task_name_means_one_task_in_every_preset() -> None:
    """Presets differ only in a head's classes: the kind, metric and target of a name are one."""
    for preset, tasks in PRESETS.items():
        assert len({task.name for task in tasks}) == len(tasks), preset
        for task in tasks:
            registered = TASKS[task.name]
            assert (task.kind, task.metric, task.target) == (registered.kind, registered.metric, registered.target)
            assert type(make_metric(task.name)) is task.metric
    assert set(TASKS) == {task.name for tasks in PRESETS.values() for task in tasks}


def _semseg(tasks) -> TaskSpec:
    return next(task for task in tasks if task.name == "semseg")


def test_preset_class_counts() -> None:
    assert _semseg(PRESETS["nyud"]).channels == 40 == dataset_classes("nyud")["semseg"]
    assert _semseg(PRESETS["nyud_npy"]).channels == 13 == dataset_classes("nyud_npy")["semseg"]
    assert _semseg(PRESETS["pascal"]).channels == 21
    assert _semseg(PRESETS["scenes"]).channels == len(CLASS_NAMES) == 11 == dataset_classes("scenes")["semseg"]
    assert [task.channels for task in PRESETS["pascal"] if task.name == "human_parts"] == [7]
    assert len(PRESETS["taskonomy"]) == 11 and {task.kind for task in PRESETS["taskonomy"]} == {"regression"}
    # the rendered rooms have no more classes than any preset's head: scenes serves every preset
    for tasks in PRESETS.values():
        for task in tasks:
            assert dataset_classes("scenes").get(task.name, 0) <= task.channels, task


@pytest.mark.parametrize(
    "dataset, tasks, name, channels",
    [
        ("scenes", "nyud", "semseg", 40),  # the default run; 21 (PASCAL's) before issue #19
        ("scenes", "pascal", "semseg", 21),
        ("scenes", "scenes", "semseg", 11),
        ("scenes", "semseg,depth", "semseg", 11),  # bare names: the preset named like the dataset
        ("scenes", "human_parts", "human_parts", 7),  # ... else the first preset that has the task
        ("scenes", "pascal:sal,semseg", "semseg", 21),
        ("nyud", "semseg,edge", "semseg", 40),
        ("nyud_npy", "semseg,depth", "semseg", 13),
        ("nyud_npy", "nyud_npy", "semseg", 13),
        ("nyud_npy", "nyud:semseg", "semseg", 40),  # a bigger head than the data's 13 classes is allowed
    ],
)
def test_the_trainer_takes_each_presets_own_tasks(dataset, tasks, name, channels) -> None:
    specs = task_specs(TrainConfig(dataset=dataset, tasks=tasks), None)
    assert [spec.channels for spec in specs if spec.name == name] == [channels]
    if ":" in tasks:
        assert [spec.name for spec in specs] == tasks.partition(":")[2].split(",")


@pytest.mark.parametrize("tasks", [*PRESETS, "pascal:sal,semseg", "semseg,human_parts"])
def test_a_baselines_single_task_runs_keep_their_presets_heads(tasks) -> None:
    """``selgroup-train baseline`` trains each task alone with the head the multi-task run gives it."""
    from selgroup_fast.train.build import single_task

    for spec in task_specs(TrainConfig(tasks=tasks), None):
        assert task_specs(TrainConfig(tasks=single_task(tasks, spec.name)), None) == [spec]


def test_label_outside_head() -> None:
    task = TaskSpec("parts", "segmentation", 3)
    assert task.label_outside_head(torch.tensor([[0, 2, IGNORE_LABEL]])) is None
    assert task.label_outside_head(torch.tensor([[0, 3, 1]])) == 3
    assert task.label_outside_head(torch.tensor([[-1, 0]])) == -1
    assert TaskSpec("depth", "regression", 1).label_outside_head(torch.full((1, 1, 2, 2), 7.0)) is None
    with pytest.raises(ValueError, match="task 'x': kind must be segmentation or regression"):
        TaskSpec("x", "classification", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task 'x': channels must be a positive int"):
        TaskSpec("x", "regression", 0)


def _nyud_with_labels(root: Path, labels: np.ndarray) -> None:
    """A fake NYUD-v2 in the paper's layout whose every segmentation map is ``labels`` (0 = void, 1..40)."""
    make_nyud(root)
    for path in (root / "segmentation").glob("*.png"):
        Image.fromarray(labels.astype(np.uint8)).save(path)


def test_nyud_with_every_class_trains(tmp_path) -> None:
    """Issue #19: labels 1..40 of the paper's layout (classes 0..39) in NYUD's 40-class head."""
    covering = np.arange(64).reshape(8, 8) % 41  # 0 (void) and every class 1..40
    _nyud_with_labels(tmp_path / "nyud", covering)
    labels = build_dataset("nyud", "train", ["semseg"], SIZE, tmp_path / "nyud")[0][1]["semseg"]
    assert set(labels.unique().tolist()) == {*range(40), IGNORE_LABEL}
    config = TrainConfig(
        dataset="nyud", data_root=str(tmp_path / "nyud"), method="gd", iters=2, out=str(tmp_path / "out"), **TINY
    )
    results = fit(config)
    assert results["tasks"] == ["semseg", "depth", "normals", "edge"]
    assert all(math.isfinite(results["metrics"][task][results["primary"][task]]) for task in results["tasks"])
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["model"]["decoders.0.weight"].shape[0] == 40


def test_a_label_outside_the_head_is_one_error_line(tmp_path, capsys) -> None:
    from selgroup_fast.train.cli import main

    labels = np.arange(64).reshape(8, 8) % 41
    labels[3, 3] = 41  # class 40 of a 40-class head
    _nyud_with_labels(tmp_path / "nyud", labels)
    args = ["--dataset", "nyud", "--data-root", str(tmp_path / "nyud"), "--method", "gd", "--iters", "1"]
    status = main([*TINY_ARGS, *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        "error: task 'semseg': label 40 is outside the head's 40 classes (0..39, or 255 = ignore)"
    ]
