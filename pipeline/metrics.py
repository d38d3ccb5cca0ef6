"""Segmentation quality from a confusion matrix: per-class IoU, mIoU, pixel accuracy and the ignore fraction.

The matrix counts pixels by (ground-truth class, predicted label). Ground-truth pixels labelled 255 (VOC's object
border, "unlabelled" in COCO-Stuff) are excluded, as every VOC/COCO evaluation does; they are only counted, so the
report can say how many there were. A *prediction* of 255 (seediff's ignore band: the mask declines to label the
pixel) is its own column: on a labelled pixel it is never correct, so it lowers the IoU of the true class like any
miss, and ``ignore_fraction`` says how much of the image the masks declined to label.

Matrices of shards, images or workers add up (``merge``), so a dataset's metrics never depend on how it was split.
Pure numpy; no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE = 255  # the label value excluded from the ground truth and the "declined" value of a prediction


class ConfusionMatrix:
    """Pixel counts ``counts[g, p]``: ground-truth class ``g`` in ``[0, num_classes)`` predicted as ``p``, where the
    last column ``p = num_classes`` holds predictions of 255. ``gt_ignored`` counts ground-truth 255 pixels."""

    def __init__(self, num_classes: int):
        if not 1 <= num_classes <= IGNORE:
            raise ValueError(f"num_classes must be in [1, {IGNORE}], got {num_classes}")
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.gt_ignored = 0

    def update(self, target: np.ndarray, prediction: np.ndarray, where: str = "prediction") -> None:
        """Add one label map pair (same shape, integer values). A value outside the class ids and 255 is an error
        naming ``where`` (e.g. the image), since it means the class list and the data disagree."""
        target, prediction = np.asarray(target), np.asarray(prediction)
        if target.shape != prediction.shape:
            raise ValueError(f"{where}: prediction shape {prediction.shape} differs from the ground truth's {target.shape}")
        labelled = target != IGNORE
        self.gt_ignored += int(target.size - np.count_nonzero(labelled))
        gt, pred = target[labelled].astype(np.int64), prediction[labelled].astype(np.int64)
        for name, values in (("ground truth", gt), ("prediction", pred[pred != IGNORE])):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                bad = sorted(set(np.unique(values).tolist()) - set(range(self.num_classes)))
                raise ValueError(f"{where}: {name} holds labels {bad[:10]} outside the {self.num_classes} classes and {IGNORE}")
        columns = np.where(pred == IGNORE, self.num_classes, pred)
        flat = gt * (self.num_classes + 1) + columns
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {self.num_classes} and {other.num_classes} classes")
        self.counts += other.counts
        self.gt_ignored += other.gt_ignored
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN) as float64; NaN where the class is in neither ground truth nor
        prediction (such a class has no IoU and is left out of the mean, as in mmsegmentation)."""
        tp = np.diag(self.counts[:, : self.num_classes]).astype(np.float64)
        union = self.counts.sum(1) + self.counts[:, : self.num_classes].sum(0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The metrics as plain JSON data (``None`` where undefined):

        ``miou`` mean IoU over the classes present; ``pixel_accuracy`` correct / labelled ground-truth pixels;
        ``labelled_pixel_accuracy`` correct / pixels the prediction labelled (not 255); ``ignore_fraction``
        pixels predicted 255 / labelled ground-truth pixels; ``gt_ignore_fraction`` ground-truth 255 pixels / all
        pixels; ``per_class`` class name -> IoU; ``classes`` per class id: name, IoU, ground-truth and predicted
        pixels; ``confusion_matrix`` the counts (rows ground truth, last column predicted 255)."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        iou = self.iou()
        labelled = int(self.counts.sum())
        declined = int(self.counts[:, self.num_classes].sum())
        correct = int(np.trace(self.counts[:, : self.num_classes]))
        present = ~np.isnan(iou)
        gt_pixels = self.counts.sum(1)
        predicted_pixels = self.counts[:, : self.num_classes].sum(0)
        return {
            "miou": float(iou[present].mean()) if present.any() else None,
            "pixel_accuracy": _ratio(correct, labelled),
            "labelled_pixel_accuracy": _ratio(correct, labelled - declined),
            "ignore_fraction": _ratio(declined, labelled),
            "gt_ignore_fraction": _ratio(self.gt_ignored, labelled + self.gt_ignored),
            "pixels": labelled,
            "per_class": {name: _number(v) for name, v in zip(class_names, iou)},
            "classes": [
                {"id": i, "name": name, "iou": _number(iou[i]), "gt_pixels": int(gt_pixels[i]),
                 "predicted_pixels": int(predicted_pixels[i])}
                for i, name in enumerate(class_names)
            ],
            "confusion_matrix": self.counts.tolist(),
        }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def format_table(metrics: dict[str, Any], title: str) -> str:
    """One report as a fixed-width table: headline numbers, then one line per class that has an IoU."""
    def pct(v: float | None) -> str:
        return "   n/a" if v is None else f"{100 * v:6.2f}"

    lines = [
        f"{title}: mIoU {pct(metrics['miou'])}  pixel acc {pct(metrics['pixel_accuracy'])}  "
        f"ignored {pct(metrics['ignore_fraction'])}  (% of {metrics['pixels']} labelled pixels; "
        f"ground-truth 255: {pct(metrics['gt_ignore_fraction'])}% excluded)",
    ]
    rows = [c for c in metrics["classes"] if c["iou"] is not None]
    width = max((len(c["name"]) for c in rows), default=5)
    lines.append(f"  {'id':>3}  {'class':<{width}}  {'IoU %':>6}  {'gt px':>10}  {'pred px':>10}")
    for c in rows:
        lines.append(f"  {c['id']:>3}  {c['name']:<{width}}  {pct(c['iou'])}  {c['gt_pixels']:>10}  {c['predicted_pixels']:>10}")
    return "\n".join(lines)
