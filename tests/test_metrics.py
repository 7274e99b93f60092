"""selgroup_fast.metrics against hand-computed cases, float64 numpy references and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    jaccard_score,
    precision_recall_curve,
)

from selgroup_fast.bench.model import PRESETS
from selgroup_fast.metrics import (
    EDGE_THRESHOLDS,
    NORMAL_MEDIAN_BIN_DEG,
    SALIENCY_THRESHOLDS,
    delta_m,
    delta_m_all,
    make_metric,
)

PRIMARY = {
    "semseg": "mIoU",
    "human_parts": "mIoU",
    "depth": "rmse",
    "normals": "mean",
    "sal": "maxF",
    "edge": "odsF_standin",
}


def _random_segmentation(classes: int, seed: int, shape=(3, 9, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], classes, *shape[1:], generator=generator)
    target = torch.randint(0, classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = 255
    return logits, target


def test_every_preset_task_has_a_metric_with_the_papers_primary() -> None:
    for specs in PRESETS.values():
        for spec in specs:
            metric = make_metric(spec.name)
            primary = PRIMARY.get(spec.name, "l1")
            assert metric.primary == primary
            assert metric.higher_is_better[primary] == (primary in ("mIoU", "maxF", "odsF_standin"))
    with pytest.raises(ValueError, match="no metric for task 'flow'"):
        make_metric("flow")


def test_segmentation_hand_case() -> None:
    # target 0 0 1 2 255, prediction 0 1 1 1 0: class 0 IoU 1/2, class 1 1/3, class 2 0/1; 2 of 4 right.
    target = torch.tensor([[[0, 0, 1, 2, 255]]])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    logits = torch.nn.functional.one_hot(predicted, 3).T.float()[None, :, None, :]
    metric = make_metric("semseg")
    metric.update(logits, target)
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)
    assert result["pixel_acc"] == pytest.approx(50.0)


def test_segmentation_matches_scikit_learn_pooled_over_batches() -> None:
    metric = make_metric("human_parts")
    truths, predictions = [], []
    for seed in range(3):
        logits, target = _random_segmentation(7, seed)
        metric.update(logits, target)
        valid = target != 255
        truths.append(target[valid].numpy())
        predictions.append(logits.argmax(1)[valid].numpy())
    truth, prediction = np.concatenate(truths), np.concatenate(predictions)
    present = np.union1d(truth, prediction)
    result = metric.compute()
    assert result["mIoU"] == pytest.approx(100 * jaccard_score(truth, prediction, labels=present, average="macro"))
    assert result["pixel_acc"] == pytest.approx(100 * accuracy_score(truth, prediction))
    assert torch.equal(metric.confusion, torch.from_numpy(confusion_matrix(truth, prediction, labels=range(7))))


def test_segmentation_averages_only_classes_that_occur() -> None:
    """A 40-way head on data with 2 classes: perfect predictions give 100, not 5."""
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.nn.functional.one_hot(target, 40).permute(0, 3, 1, 2).float()
    metric = make_metric("semseg")
    metric.update(logits, target)
    assert metric.compute()["mIoU"] == 100.0


def _reference_depth(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    valid = np.isfinite(truth) & (truth > 0)
    p, t = predicted[valid].astype(np.float64), truth[valid].astype(np.float64)
    return {
        "rmse": math.sqrt(np.mean((p - t) ** 2)),
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "log_rmse": math.sqrt(np.mean((np.log(np.maximum(p, 1e-9)) - np.log(t)) ** 2)),
    }


def test_depth_hand_case_and_reference() -> None:
    metric = make_metric("depth")
    # errors 1 and -1 on truths 2 and 4; NaN and 0 are invalid.
    metric.update(torch.tensor([[[[3.0, 3.0, 5.0, 1.0]]]]), torch.tensor([[[[2.0, 4.0, float("nan"), 0.0]]]]))
    result = metric.compute()
    assert result["rmse"] == pytest.approx(1.0)
    assert result["abs_rel"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert result["log_rmse"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(0.75) ** 2) / 2))

    generator = torch.Generator().manual_seed(0)
    metric.reset()
    outputs, targets = [], []
    for _ in range(3):
        output = torch.rand(2, 1, 6, 7, generator=generator) * 5 - 0.5  # some negative predictions
        target = torch.rand(2, 1, 6, 7, generator=generator) * 5 + 0.1
        target[torch.rand(target.shape, generator=generator) < 0.2] = float("nan")
        metric.update(output, target)
        outputs.append(output.numpy())
        targets.append(target.numpy())
    expected = _reference_depth(np.concatenate(outputs), np.concatenate(targets))
    assert metric.compute() == pytest.approx(expected, rel=1e-6)


def _reference_angles(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angles (degrees) with arccos of the cosine, in float64, over valid truths."""
    predicted, truth = predicted.astype(np.float64), truth.astype(np.float64)
    valid = np.isfinite(truth).all(1) & (np.abs(np.nan_to_num(truth)).sum(1) > 0)
    p = np.moveaxis(predicted, 1, -1)[valid]
    t = np.moveaxis(truth, 1, -1)[valid]
    cosine = (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def test_normals_hand_case() -> None:
    s = 1 / math.sqrt(2)
    output = torch.tensor([[1.0, 0, 0], [s, s, 0], [0, 0, 2], [5, 5, 5]]).T.reshape(1, 3, 1, 4)
    target = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]).T.reshape(1, 3, 1, 4)  # last: invalid
    metric = make_metric("normals")
    metric.update(output, target)
    result = metric.compute()
    assert result["mean"] == pytest.approx((90 + 45 + 0) / 3)
    assert result["rmse"] == pytest.approx(math.sqrt((90**2 + 45**2) / 3))
    assert result["median"] == pytest.approx(45, abs=NORMAL_MEDIAN_BIN_DEG)
    assert result["within_11.25"] == pytest.approx(100 / 3)
    assert result["within_22.5"] == pytest.approx(100 / 3)
    assert result["within_30"] == pytest.approx(100 / 3)


def test_normals_match_a_float64_reference() -> None:
    generator = torch.Generator().manual_seed(1)
    metric = make_metric("normals")
    outputs, targets = [], []
    for _ in range(2):
        target = torch.nn.functional.normalize(torch.randn(2, 3, 8, 9, generator=generator), dim=1)
        output = target + 0.6 * torch.randn(target.shape, generator=generator)
        target[:, :, 0] = float("nan")
        target[:, :, 1, :3] = 0.0
        metric.update(output, target)
        outputs.append(output.numpy())
        targets.append(target.numpy())
    angles = _reference_angles(np.concatenate(outputs), np.concatenate(targets))
    result = metric.compute()
    assert result["mean"] == pytest.approx(angles.mean(), rel=1e-6)
    assert result["rmse"] == pytest.approx(math.sqrt((angles**2).mean()), rel=1e-6)
    assert result["median"] == pytest.approx(np.median(angles), abs=NORMAL_MEDIAN_BIN_DEG)
    for limit in (11.25, 22.5, 30):
        assert result[f"within_{limit:g}"] == pytest.approx(100 * (angles < limit).mean())


def _foreground_logits(probability: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax gives ``probability`` for class 1."""
    return torch.stack([torch.zeros_like(probability), torch.logit(probability.double()).float()], 1)


def test_saliency_hand_case() -> None:
    # probabilities 0.9 0.6 0.3 0.1 on truth 1 1 0 1 (and one ignored pixel).
    probability = torch.tensor([[[0.9, 0.6, 0.3, 0.1, 0.99]]])
    target = torch.tensor([[[1, 1, 0, 1, 255]]])
    metric = make_metric("sal")
    metric.update(_foreground_logits(probability), target)
    beta2 = 0.3

    def f(tp: int, predicted: int, actual: int = 3) -> float:
        precision, recall = tp / predicted, tp / actual
        return (1 + beta2) * precision * recall / (beta2 * precision + recall)

    # thresholds <= 0.1: all 4 predicted (3 right); (0.1, 0.3]: 3 (2 right); (0.3, 0.6]: 2 (2); (0.6, 0.9]: 1 (1).
    expected_f = max(f(3, 4), f(2, 3), f(2, 2), f(1, 1))
    expected_iou = max(3 / 4, 2 / 4, 2 / 3, 1 / 3)
    result = metric.compute()
    assert result["maxF"] == pytest.approx(100 * expected_f)
    assert result["mIoU"] == pytest.approx(100 * expected_iou)


def test_saliency_matches_a_reference_loop() -> None:
    generator = torch.Generator().manual_seed(2)
    probability = torch.rand(4, 6, 6, generator=generator)
    target = (torch.rand(4, 6, 6, generator=generator) < probability).long()
    target[0] = 0  # an image with no salient pixel
    target[1, 0] = 255
    metric = make_metric("sal")
    metric.update(_foreground_logits(probability[:2]), target[:2])
    metric.update(_foreground_logits(probability[2:]), target[2:])
    p = torch.softmax(_foreground_logits(probability).double(), 1)[:, 1].numpy()
    t, valid = target.numpy() == 1, target.numpy() != 255
    best_f, best_iou = 0.0, 0.0
    for threshold in SALIENCY_THRESHOLDS:
        predicted = (p >= np.float32(threshold)) & valid
        tp = (predicted & t).sum()
        precision, recall = tp / predicted.sum(), tp / t.sum()
        f = 1.3 * precision * recall / (0.3 * precision + recall) if tp else 0.0
        ious = [((pi & ti).sum() / (pi | ti).sum()) if (pi | ti).any() else 1.0 for pi, ti in zip(predicted, t)]
        best_f, best_iou = max(best_f, f), max(best_iou, float(np.mean(ious)))
    result = metric.compute()
    assert result["maxF"] == pytest.approx(100 * best_f)
    assert result["mIoU"] == pytest.approx(100 * best_iou)


def test_edge_standin_hand_case_and_reference() -> None:
    probability = torch.tensor([[[0.95, 0.7, 0.4, 0.2, 0.05, 0.5]]])
    target = torch.tensor([[[1, 1, 0, 1, 0, 255]]])
    metric = make_metric("edge")
    metric.update(_foreground_logits(probability), target)
    # threshold in (0.4, 0.7]: 2 predicted, both right, recall 2/3 -> F = 0.8; (0.05, 0.2]: 4 predicted, 3 right -> 6/7.
    assert metric.compute()["odsF_standin"] == pytest.approx(100 * 6 / 7)

    generator = torch.Generator().manual_seed(3)
    probability = torch.rand(3, 10, 10, generator=generator)
    target = (torch.rand(3, 10, 10, generator=generator) < probability**2).long()
    metric.reset()
    metric.update(_foreground_logits(probability), target)
    p = torch.softmax(_foreground_logits(probability), 1)[:, 1].numpy().ravel()
    t = target.numpy().ravel() == 1
    scores = []
    for threshold in EDGE_THRESHOLDS:
        predicted = p >= np.float32(threshold)
        tp = (predicted & t).sum()
        scores.append(2 * tp / (predicted.sum() + t.sum()))
    result = metric.compute()["odsF_standin"]
    assert result == pytest.approx(100 * max(scores))
    # scikit-learn's curve tries every score as a threshold: its best F bounds the stand-in from above.
    precision, recall, _ = precision_recall_curve(t, p)
    best = np.nanmax(2 * precision * recall / (precision + recall))
    assert result <= 100 * best + 1e-9 and result > 100 * best - 5


def test_l1_matches_numpy() -> None:
    generator = torch.Generator().manual_seed(4)
    output, target = torch.randn(2, 2, 5, 5, generator=generator), torch.randn(2, 2, 5, 5, generator=generator)
    target[0, 1, :2] = float("nan")
    metric = make_metric("principal_curvature")
    metric.update(output, target)
    expected = np.nanmean(np.abs(output.double().numpy() - target.double().numpy()))
    assert metric.compute() == {"l1": pytest.approx(expected)}


@pytest.mark.parametrize(
    ("task", "output", "target", "message"),
    [
        ("semseg", torch.zeros(1, 3, 4), torch.zeros(1, 3, 4, dtype=torch.long), "output must be a float tensor"),
        ("semseg", torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), "integer labels"),
        ("semseg", torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 3), r"labels must be in \[0, 3\)"),
        ("semseg", torch.zeros(2, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "differ in batch"),
        ("depth", torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), "1 channel"),
        ("normals", torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), "3 channels"),
        ("sal", torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "1 .logit. or 2"),
        ("edge", torch.zeros(1, 2, 4, 4), torch.full((1, 4, 4), 2), "0, 1 or 255"),
        ("reshading", torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), "channels"),
    ],
)
def test_bad_batches_are_refused(task, output, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_metric(task).update(output, target)


def test_compute_without_data_is_refused() -> None:
    for task in ("semseg", "depth", "normals", "sal", "edge", "keypoints2d"):
        with pytest.raises(ValueError, match="no valid pixel"):
            make_metric(task).compute()


HIGHER = {"semseg": {"mIoU": True, "pixel_acc": True}, "depth": {"rmse": False, "abs_rel": False}}
PRIMARY_OF = {"semseg": "mIoU", "depth": "rmse"}
BASELINE = {"semseg": {"mIoU": 40.0, "pixel_acc": 60.0}, "depth": {"rmse": 0.5, "abs_rel": 0.2}}


def test_delta_m_hand_case() -> None:
    metrics = {"semseg": {"mIoU": 44.0, "pixel_acc": 57.0}, "depth": {"rmse": 0.55, "abs_rel": 0.15}}
    # semseg +10 %, depth rmse 10 % worse: mean 0; over all: semseg (+10 - 5)/2, depth (-10 + 25)/2.
    assert delta_m(metrics, BASELINE, HIGHER, PRIMARY_OF) == pytest.approx(0.0)
    assert delta_m_all(metrics, BASELINE, HIGHER) == pytest.approx(((10 - 5) / 2 + (-10 + 25) / 2) / 2)
    assert delta_m(BASELINE, BASELINE, HIGHER, PRIMARY_OF) == 0.0
    better = {"semseg": {"mIoU": 50.0, "pixel_acc": 60.0}, "depth": {"rmse": 0.4, "abs_rel": 0.2}}
    assert delta_m(better, BASELINE, HIGHER, PRIMARY_OF) == pytest.approx((25 + 20) / 2)


def test_delta_m_refuses_incomplete_inputs() -> None:
    metrics = {"semseg": {"mIoU": 44.0, "pixel_acc": 57.0}, "normals": {"mean": 20.0}}
    with pytest.raises(ValueError, match="task 'normals' has no baseline"):
        delta_m(metrics, BASELINE, HIGHER, PRIMARY_OF)
    with pytest.raises(ValueError, match="undefined"):
        delta_m({"depth": {"rmse": 0.5}}, {"depth": {"rmse": 0.0}}, HIGHER, PRIMARY_OF)
    with pytest.raises(ValueError, match="no metric 'abs_rel'"):
        delta_m_all({"depth": {"rmse": 0.5}}, BASELINE, HIGHER)
