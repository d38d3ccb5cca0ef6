"""The evaluation core against an independent implementation: torchmetrics' multiclass Jaccard index (per class and
macro mean) on the same label maps, with ground-truth 255 excluded and predicted 255 (seediff's ignore band)
counted as a miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from seediff.pipeline.metrics import IGNORE, ConfusionMatrix

NUM_CLASSES = 6


def random_pairs(seed: int, n: int, declined: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ground truth with a 255 border and one class never present; predictions mostly right, some wrong, some
    predicted 255 when ``declined``. Several sizes, as images of a dataset have."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        h, w = 20 + 7 * i, 31 - 3 * i
        target = rng.choice([0, 1, 2, 4, 5], size=(h, w)).astype(np.uint8)  # class 3 never in the ground truth
        target[0, :] = target[:, 0] = IGNORE
        prediction = np.where(rng.random((h, w)) < 0.6, target, rng.integers(0, NUM_CLASSES, (h, w))).astype(np.uint8)
        prediction[target == IGNORE] = rng.integers(0, NUM_CLASSES, int((target == IGNORE).sum()))
        if declined:
            prediction[rng.random((h, w)) < 0.1] = IGNORE
        pairs.append((target, prediction))
    return pairs


def torchmetrics_iou(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> np.ndarray:
    """Per-class IoU from torchmetrics. Predicted 255 becomes an extra class that no ground truth holds, so it is
    a false negative of the true class and never a true positive, exactly our definition."""
    metric = MulticlassJaccardIndex(num_classes=num_classes + 1, ignore_index=IGNORE, average="none")
    for target, prediction in pairs:
        preds = torch.from_numpy(np.where(prediction == IGNORE, num_classes, prediction).astype(np.int64))
        metric.update(preds, torch.from_numpy(target.astype(np.int64)))
    return metric.compute().double().numpy()[:num_classes]


@pytest.mark.parametrize("declined", [False, True])
def test_iou_and_miou_match_torchmetrics(declined: bool) -> None:
    pairs = random_pairs(0, 5, declined)
    matrix = ConfusionMatrix(NUM_CLASSES)
    for target, prediction in pairs:
        matrix.update(target, prediction)
    ours = matrix.summary([f"c{i}" for i in range(NUM_CLASSES)])
    reference = torchmetrics_iou(pairs, NUM_CLASSES)
    for i in range(NUM_CLASSES):
        assert ours["per_class"][f"c{i}"] == pytest.approx(reference[i], abs=1e-6)
    # Class 3 is only ever predicted: IoU 0 (present) in both. Mean over the classes present = torchmetrics' macro.
    assert ours["per_class"]["c3"] == 0.0
    assert ours["miou"] == pytest.approx(reference.mean(), abs=1e-6)
    if not declined:
        macro = MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE, average="macro")
        for target, prediction in pairs:
            macro.update(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))
        assert ours["miou"] == pytest.approx(float(macro.compute()), abs=1e-6)


def test_pixel_accuracy_and_ignore_fractions_count_the_right_pixels() -> None:
    target = np.array([[1, 1, 0, IGNORE], [2, 2, 0, IGNORE]], dtype=np.uint8)
    prediction = np.array([[1, IGNORE, 0, 1], [2, 1, 0, 2]], dtype=np.uint8)
    matrix = ConfusionMatrix(3)
    matrix.update(target, prediction)
    report = matrix.summary(["background", "dog", "cat"])
    assert report["pixels"] == 6  # the two ground-truth 255 pixels are excluded whatever was predicted there
    assert report["pixel_accuracy"] == pytest.approx(4 / 6)
    assert report["labelled_pixel_accuracy"] == pytest.approx(4 / 5)
    assert report["ignore_fraction"] == pytest.approx(1 / 6)
    assert report["gt_ignore_fraction"] == pytest.approx(2 / 8)
    assert report["per_class"] == {"background": 1.0, "dog": pytest.approx(1 / 3), "cat": pytest.approx(1 / 2)}


def test_matrices_of_shards_add_up_to_the_whole() -> None:
    pairs = random_pairs(1, 4, declined=True)
    whole, first, second = ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES)
    for i, (target, prediction) in enumerate(pairs):
        whole.update(target, prediction)
        (first if i < 2 else second).update(target, prediction)
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.gt_ignored == whole.gt_ignored


def test_absent_class_has_no_iou_and_bad_labels_name_the_image() -> None:
    matrix = ConfusionMatrix(4)
    matrix.update(np.zeros((2, 2), np.uint8), np.array([[0, 1], [0, 0]], np.uint8))
    report = matrix.summary(["bg", "a", "b", "c"])
    assert report["per_class"]["b"] is None and report["per_class"]["c"] is None
    assert report["miou"] == pytest.approx((3 / 4 + 0) / 2)
    with pytest.raises(ValueError, match=r"img7: prediction holds labels \[9\]"):
        matrix.update(np.zeros((1, 2), np.uint8), np.array([[0, 9]], np.uint8), where="img7")
    with pytest.raises(ValueError, match="shape"):
        matrix.update(np.zeros((1, 2), np.uint8), np.zeros((2, 1), np.uint8))
