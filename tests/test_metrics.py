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

from selgroup_fast.metrics import (
    EDGE_THRESHOLDS,
    NORMAL_MEDIAN_BIN_DEG,
    SALIENCY_IOU_THRESHOLDS,
    SALIENCY_THRESHOLDS,
    delta_m,
    delta_m_all,
    make_metric,
)
from selgroup_fast.tasks import PRESETS

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


def _papers_semseg_miou(batches: list[tuple[np.ndarray, np.ndarray]], classes: int) -> float:
    """The paper's ``SemsegMeter`` (wooseong97/sel-update-mtl ``evaluation/eval_semseg.py``), re-derived.

    Per class of the head: true positives, false positives and false negatives over the pixels
    whose label is != 255, summed over batches; IoU = tp / max(tp + fp + fn, 1e-8); the mean over
    every class of the head.
    """
    tp, fp, fn = np.zeros(classes), np.zeros(classes), np.zeros(classes)
    for predicted, truth in batches:
        valid = truth != 255
        for c in range(classes):
            tp[c] += ((truth == c) & (predicted == c) & valid).sum()
            fp[c] += ((truth != c) & (predicted == c) & valid).sum()
            fn[c] += ((truth == c) & (predicted != c) & valid).sum()
    return float(np.mean(tp / np.maximum(tp + fp + fn, 1e-8)))


def test_segmentation_equals_the_papers_meter_when_every_class_occurs() -> None:
    metric = make_metric("semseg")
    batches = []
    for seed in (5, 6):
        logits, target = _random_segmentation(4, seed)
        metric.update(logits, target)
        batches.append((logits.argmax(1).numpy(), target.numpy()))
    assert set(np.concatenate([t.ravel() for _, t in batches])) == {0, 1, 2, 3, 255}
    assert metric.compute()["mIoU"] == pytest.approx(100 * _papers_semseg_miou(batches, 4), rel=1e-12)


def test_segmentation_averages_only_classes_that_occur() -> None:
    """A 40-way head on data with 2 classes: perfect predictions give 100, not 5."""
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.nn.functional.one_hot(target, 40).permute(0, 3, 1, 2).float()
    metric = make_metric("semseg")
    metric.update(logits, target)
    assert metric.compute()["mIoU"] == 100.0


def _papers_depth_meter(batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The paper's depth evaluation (wooseong97/sel-update-mtl), re-derived in float64.

    ``utils/utils.py`` ``get_output`` clamps the depth output at 0; ``data/transforms.py``
    ``AddIgnoreRegions`` turns a missing depth (0; NaN in this project's loaders) into 255;
    ``evaluation/eval_depth.py`` ``DepthMeter.update`` keeps ``gt != 255``, sets ``gt <= 0`` and
    ``pred <= 0`` to 1e-9, and sums the squared, relative and squared-log errors over batches;
    ``get_score`` divides by the pixel count.
    """
    pixels = squared = relative = squared_log = 0.0
    for output, target in batches:
        predicted = np.maximum(output.astype(np.float64), 0.0)
        truth = np.where(np.isnan(target) | (target == 0), 255.0, target.astype(np.float64))
        mask = truth != 255
        truth[truth <= 0] = 1e-9
        predicted[predicted <= 0] = 1e-9
        p, t = predicted[mask], truth[mask]
        pixels += mask.sum()
        squared += ((t - p) ** 2).sum()
        relative += (np.abs(t - p) / t).sum()
        squared_log += ((np.log(t) - np.log(p)) ** 2).sum()
    return {
        "rmse": math.sqrt(squared / pixels),
        "abs_rel": relative / pixels,
        "log_rmse": math.sqrt(squared_log / pixels),
    }


def test_depth_hand_case() -> None:
    metric = make_metric("depth")
    # errors 1 and -1 on truths 2 and 4; NaN and 0 are invalid.
    metric.update(torch.tensor([[[[3.0, 3.0, 5.0, 1.0]]]]), torch.tensor([[[[2.0, 4.0, float("nan"), 0.0]]]]))
    result = metric.compute()
    assert result["rmse"] == pytest.approx(1.0)
    assert result["abs_rel"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert result["log_rmse"] == pytest.approx(math.sqrt((math.log(1.5) ** 2 + math.log(0.75) ** 2) / 2))


def test_depth_counts_a_negative_prediction_as_1e_9_in_every_error() -> None:
    """Issue #19 item 3: the raw -1 (and 0) predictions are errors of 2 - 1e-9 and 3 - 1e-9, not 3 and 3."""
    metric = make_metric("depth")
    metric.update(torch.tensor([[[[-1.0, 0.0, 5.0]]]]), torch.tensor([[[[2.0, 3.0, 4.0]]]]))
    floor = 1e-9
    errors = [2 - floor, 3 - floor, 1.0]
    result = metric.compute()
    assert result["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3), rel=1e-12)
    assert result["abs_rel"] == pytest.approx(((2 - floor) / 2 + (3 - floor) / 3 + 1 / 4) / 3, rel=1e-12)
    logs = [math.log(2 / floor), math.log(3 / floor), math.log(5 / 4)]
    assert result["log_rmse"] == pytest.approx(math.sqrt(sum(x * x for x in logs) / 3), rel=1e-12)


def test_depth_equals_the_papers_meter_over_batches_with_negative_predictions() -> None:
    generator = torch.Generator().manual_seed(0)
    metric = make_metric("depth")
    batches = []
    for size in (2, 3, 1):
        output = torch.rand(size, 1, 6, 7, generator=generator) * 5 - 1.5  # about 30 % negative predictions
        target = torch.rand(size, 1, 6, 7, generator=generator) * 5 + 0.1
        target[torch.rand(target.shape, generator=generator) < 0.2] = float("nan")
        target[torch.rand(target.shape, generator=generator) < 0.1] = 0.0
        metric.update(output, target)
        batches.append((output.numpy(), target.numpy()))
    assert metric.compute() == pytest.approx(_papers_depth_meter(batches), rel=1e-9)


def test_depth_keeps_a_nan_prediction() -> None:
    metric = make_metric("depth")
    metric.update(torch.tensor([[[[float("nan"), 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]))
    assert all(math.isnan(value) for value in metric.compute().values())


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


def _papers_normals_mean(batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The paper's normals evaluation (wooseong97/sel-update-mtl), re-derived in float64.

    ``get_output`` L2-normalises the output (``F.normalize``: a zero vector stays zero) and maps
    it to ``(n + 1) 255 / 2``; ``AddIgnoreRegions`` turns a zero-norm normal (NaN here too) into
    255; ``evaluation/eval_normals.py`` ``NormalsMeter.update`` maps back ``2 p / 255 - 1``, keeps
    the pixels whose three channels are all != 255, normalises both (``normalize_tensor``: zero
    stays zero) and takes ``2 atan2(|p - g|, |p + g|)`` in degrees; ``get_score``: sum / count.
    """

    def normalise(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)

    total, count = 0.0, 0
    for output, target in batches:
        encoded = (normalise(output.astype(np.float64)) + 1.0) * 255 / 2.0
        predicted = normalise(2 * encoded / 255 - 1)
        truth = np.nan_to_num(target.astype(np.float64))
        truth = np.where((np.linalg.norm(truth, axis=1, keepdims=True) == 0) | np.isnan(target), 255.0, truth)
        valid = (truth != 255).all(1)
        truth = normalise(truth)
        angle = np.degrees(
            2 * np.arctan2(np.linalg.norm(predicted - truth, axis=1), np.linalg.norm(predicted + truth, axis=1))
        )
        total += angle[valid].sum()
        count += int(valid.sum())
    return total / count


def test_normals_mean_equals_the_papers_meter() -> None:
    generator = torch.Generator().manual_seed(5)
    metric = make_metric("normals")
    batches = []
    for size in (2, 1):
        target = torch.nn.functional.normalize(torch.randn(size, 3, 5, 6, generator=generator), dim=1)
        output = 3 * (target + 0.8 * torch.randn(target.shape, generator=generator))  # not unit length
        output[0, :, 0, 0] = 0.0  # a zero prediction: 90 degrees from every truth in both
        target[:, :, 1] = float("nan")
        target[:, :, 2, :2] = 0.0
        metric.update(output, target)
        batches.append((output.numpy(), target.numpy()))
    assert metric.compute()["mean"] == pytest.approx(_papers_normals_mean(batches), rel=1e-9)


def _foreground_logits(probability: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax gives ``probability`` for class 1."""
    return torch.stack([torch.zeros_like(probability), torch.logit(probability.double()).float()], 1)


def test_saliency_hand_case() -> None:
    # probabilities 0.9 0.5 0.3 0.15 on truth 1 1 0 1 (and one ignored pixel).
    probability = torch.tensor([[[0.9, 0.5, 0.3, 0.15, 0.99]]])
    target = torch.tensor([[[1, 1, 0, 1, 255]]])
    metric = make_metric("sal")
    metric.update(_foreground_logits(probability), target)
    beta2 = 0.3

    def f(tp: int, predicted: int, actual: int = 3) -> float:
        precision, recall = tp / predicted, tp / actual
        return (1 + beta2) * precision * recall / (beta2 * precision + recall)

    # maxF, probability >= t for t = 0.05 ... 0.95: t <= 0.15: all 4 predicted (3 right);
    # (0.15, 0.3]: 3 (2 right); (0.3, 0.5]: 2 (2); (0.5, 0.9]: 1 (1).
    expected_f = max(f(3, 4), f(2, 3), f(2, 2), f(1, 1))
    # mIoU, probability > t for t = 0.2 ... 0.9 (Issue #19 item 4): t = 0.2: 3 predicted, 2 right
    # (IoU 2/4); 0.25 ... 0.45: 2/3; 0.5 (0.5 itself is not above it) ... 0.85: 1/3; 0.9: 0.
    # Thresholds from 0.05 with >= would reach 3/4 at 0.15.
    expected_iou = max(2 / 4, 2 / 3, 1 / 3, 0)
    result = metric.compute()
    assert result["maxF"] == pytest.approx(100 * expected_f)
    assert result["mIoU"] == pytest.approx(100 * expected_iou)


def _papers_saliency_max_f(probabilities: list[torch.Tensor], targets: list[np.ndarray]) -> float:
    """The paper's maxF (wooseong97/sel-update-mtl ``evaluation/eval_sal.py``, from InvPT), re-derived.

    ``SaliencyMeter``: thresholds ``torch.arange(0.05, 1, 0.05)`` (float32), ``preds >= thresh``
    over the pixels whose target is != 255; true, predicted and actual positives summed over
    batches; F = (1 + 0.3) P R / (0.3 P + R), NaN -> 0; the maximum. Its ``update`` takes the
    probability through a sigmoid a second time; this re-derivation does not (the intent).
    """
    thresholds = torch.arange(0.05, 1, 0.05)
    counts = np.zeros((3, len(thresholds)))
    for probability, target in zip(probabilities, targets, strict=True):
        valid = target != 255
        for k, threshold in enumerate(thresholds):
            predicted = (probability >= threshold).numpy()[valid]
            truth = target[valid] == 1
            counts[:, k] += [(predicted & truth).sum(), predicted.sum(), truth.sum()]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = counts[0] / counts[1], counts[0] / counts[2]
        f = 1.3 * precision * recall / (0.3 * precision + recall)
    return float(np.nan_to_num(f, nan=0.0).max())


def _mtl_pytorch_saliency_miou(probabilities: list[torch.Tensor], targets: list[np.ndarray]) -> float:
    """Multi-Task-Learning-PyTorch's saliency mIoU (``evaluation/eval_sal.py``, ``jaccard.py``), re-derived.

    ``get_output`` gives ``255 sigmoid(x)``; ``SaliencyMeter.update`` divides by 255 and
    thresholds ``pred > t`` for t in ``np.linspace(0.2, 0.9, 15)``; ``jaccard(gt, pred, void)``
    is 1 when neither has a non-void pixel, else |gt & pred| / |gt | pred| over non-void pixels;
    ``get_score`` averages over images and takes the maximum over thresholds. Void = label 255
    (its meter passes no void mask; this project leaves the ignore label out).
    """
    per_image = []
    for probability, target in zip(probabilities, targets, strict=True):
        probability = (255 * probability) / 255.0
        rows = []
        for threshold in np.linspace(0.2, 0.9, 15):
            predicted = (probability > threshold).numpy()
            truth, void = target == 1, target == 255
            row = []
            for p, t, v in zip(predicted, truth, void, strict=True):
                if not (t & ~v).any() and not (p & ~v).any():
                    row.append(1.0)
                else:
                    row.append(((t & p) & ~v).sum() / ((t | p) & ~v).sum())
            rows.append(row)
        per_image.append(np.array(rows).T)  # [images, thresholds]
    return float(np.concatenate(per_image).mean(0).max())


def test_saliency_equals_the_peers_meters_over_batches() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(5, 1, 6, 6, generator=generator)  # one-channel head: sigmoid
    probability = torch.sigmoid(logits[:, 0])
    target = (torch.rand(5, 6, 6, generator=generator) < probability).long()
    target[0] = 0  # an image with no salient pixel
    target[1, 0] = 255
    target[2] = 255  # an image with nothing to score
    metric = make_metric("sal")
    batches = [(logits[:2], target[:2]), (logits[2:], target[2:])]
    for output, labels in batches:
        metric.update(output, labels)
    probabilities = [torch.sigmoid(output[:, 0]) for output, _ in batches]
    targets = [labels.numpy() for _, labels in batches]
    result = metric.compute()
    assert result["maxF"] == pytest.approx(100 * _papers_saliency_max_f(probabilities, targets), rel=1e-12)
    assert result["mIoU"] == pytest.approx(100 * _mtl_pytorch_saliency_miou(probabilities, targets), rel=1e-6)


def test_saliency_thresholds_are_the_peers() -> None:
    assert SALIENCY_THRESHOLDS == tuple(torch.arange(0.05, 1, 0.05).tolist())  # the 12th is 0.6 less 1 ulp
    assert SALIENCY_IOU_THRESHOLDS == tuple(np.linspace(0.2, 0.9, 15).tolist())


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


def test_l1_equals_the_papers_taskonomy_metric_over_batches() -> None:
    """The paper's Taskonomy evaluation (wooseong97/sel-update-mtl ``util_taskonomy/engine_mt.py``).

    ``get_metric`` gives ``F.l1_loss`` (the mean over the batch's elements) for 8 of the 11 tasks;
    ``evaluate`` feeds it to a ``MetricLogger`` meter with ``n = batch size``, whose
    ``global_avg`` is the batch-size-weighted mean of the batches' values. Batches of 3 and 1.
    """
    generator = torch.Generator().manual_seed(7)
    metric = make_metric("keypoints2d")
    weighted, images = 0.0, 0
    for size in (3, 1):
        output, target = torch.randn(size, 1, 4, 5, generator=generator), torch.rand(size, 1, 4, 5, generator=generator)
        metric.update(output, target)
        weighted += size * np.abs(output.double().numpy() - target.double().numpy()).mean()
        images += size
    assert metric.compute()["l1"] == pytest.approx(weighted / images, rel=1e-12)


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


def _libmtl_improvement(base: dict, new: dict, weight: dict) -> float:
    """LibMTL's ``count_improvement`` (``LibMTL/utils.py``), re-derived: for each task the mean over its
    metrics of (-1)^w (B - N) / B (w = 1 when higher is better), then the mean over tasks; a fraction."""
    per_task = [
        np.mean([(-1) ** w * (b - n) / b for b, n, w in zip(base[t], new[t], weight[t], strict=True)]) for t in base
    ]
    return float(np.mean(per_task))


def _nash_mtl_delta(base: np.ndarray, new: np.ndarray, higher: np.ndarray) -> float:
    """nash-mtl's and FAMO's ``delta_fn`` (``experiments/nyuv2/utils.py``), re-derived: the mean over every
    (task, metric) pair of (-1)^SIGN (N - B) / B x 100, SIGN = 1 when higher is better; lower is better."""
    return float(((-1.0) ** higher * (new - base) / base).mean() * 100)


def test_delta_m_all_is_libmtls_and_not_nash_mtls() -> None:
    # semseg has 2 metrics, depth 2, normals 3: per task first (LibMTL) differs from pooled (nash-mtl).
    higher = {**HIGHER, "normals": {"mean": False, "within_11.25": True, "within_30": True}}
    baseline = {**BASELINE, "normals": {"mean": 30.0, "within_11.25": 20.0, "within_30": 50.0}}
    metrics = {
        "semseg": {"mIoU": 44.0, "pixel_acc": 57.0},
        "depth": {"rmse": 0.55, "abs_rel": 0.15},
        "normals": {"mean": 27.0, "within_11.25": 26.0, "within_30": 55.0},
    }
    names = {task: list(higher[task]) for task in higher}
    base = {task: [baseline[task][m] for m in names[task]] for task in names}
    new = {task: [metrics[task][m] for m in names[task]] for task in names}
    weight = {task: [int(higher[task][m]) for m in names[task]] for task in names}
    ours = delta_m_all(metrics, baseline, higher)
    assert ours == pytest.approx(100 * _libmtl_improvement(base, new, weight), rel=1e-12)
    flat = [np.concatenate([np.array(table[t], dtype=float) for t in names]) for table in (base, new, weight)]
    pooled = _nash_mtl_delta(*flat)
    assert abs(ours + pooled) > 1.0  # a different number, not only the opposite sign
    # With the same number of metrics in every task the two agree up to the sign.
    two = {task: dict(list(higher[task].items())[:2]) for task in higher}
    flat_two = [np.array([table[t][m] for t in two for m in two[t]], dtype=float) for table in (baseline, metrics, two)]
    assert delta_m_all(metrics, baseline, two) == pytest.approx(-_nash_mtl_delta(*flat_two), rel=1e-12)
