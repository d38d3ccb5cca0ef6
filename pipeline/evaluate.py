"""Scoring label maps against a labelled dataset: one confusion matrix per method (the SeeDiff label maps in
``mask.png`` and, when the output has them, the plain cross-attention maps in ``cross.png``), accumulated over every
shard of the predictions' output root, then reported as ``metrics.json`` and a table.

Predictions are matched to ground truth by sample key = image id (``seediff annotate`` keys the samples of a
labelled dataset by image id; ``seediff export`` names images by sample key). An image without a prediction (a
failed sample) counts as predicted 255 everywhere, so failures lower the scores instead of vanishing from them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from seediff.pipeline.layouts import LabelledDataset, read_label_map
from seediff.pipeline.metrics import IGNORE, ConfusionMatrix, format_table
from seediff.pipeline.readers import MASK_FIELD, raw_samples
from seediff.schemas.records import decode_mask
from seediff.storage import output_fs, write_file

CROSS_FIELD = "cross.png"  # label map of the thresholded coarse cross-attention maps, written for evaluation
METHODS = {"seediff": MASK_FIELD, "cross_attention": CROSS_FIELD}
METRICS_JSON = "metrics.json"


def score_predictions(dataset: LabelledDataset, predictions: str) -> dict[str, Any]:
    """Metrics of the output root ``predictions`` on ``dataset``: the SeeDiff ones at the top level, the
    cross-attention ones under ``cross_attention`` (absent when the output has no ``cross.png``)."""
    names = dataset.class_names
    matrices = {method: ConfusionMatrix(len(names)) for method in METHODS}
    wanted = {item.name: item for item in dataset.images}
    scored: set[str] = set()
    methods_seen: set[str] = set()
    for sample in raw_samples(predictions):
        key = sample["__key__"]
        item = wanted.get(key)
        if item is None or key in scored:
            continue
        target = read_label_map(item.label)
        for method, field in METHODS.items():
            if field in sample:
                prediction = decode_mask(sample[field])
                _check_size(prediction, target, f"{sample['__url__']}: sample {key}: {field}")
                matrices[method].update(target, prediction, where=f"{item.label} vs sample {key} {field}")
                methods_seen.add(method)
        scored.add(key)
    missing = [item for item in dataset.images if item.name not in scored]
    for item in missing:
        target = read_label_map(item.label)
        for matrix in matrices.values():
            matrix.update(target, np.full_like(target, IGNORE))
    report = matrices["seediff"].summary(names)
    if "cross_attention" in methods_seen:
        report["cross_attention"] = matrices["cross_attention"].summary(names)
    report.update(
        dataset={"root": dataset.root, "layout": dataset.layout, "split": dataset.split, "images": len(dataset.images)},
        predictions=predictions,
        missing_predictions=len(missing),
        missing_examples=[item.name for item in missing[:10]],
    )
    return report


def _check_size(prediction: np.ndarray, target: np.ndarray, where: str) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"{where}: label map {prediction.shape[1]}x{prediction.shape[0]} but the ground truth is "
                         f"{target.shape[1]}x{target.shape[0]}")


def write_report(report: dict[str, Any], out: str) -> str:
    """``OUT/metrics.json``; returns its path."""
    fs, root = output_fs(out)
    path = f"{root}/{METRICS_JSON}"
    write_file(fs, path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def format_report(report: dict[str, Any]) -> str:
    tables = [format_table(report, "seediff")]
    if "cross_attention" in report:
        tables.append(format_table(report["cross_attention"], "cross-attention"))
    dataset = report["dataset"]
    head = (f"{dataset['root']} ({dataset['layout']}" + (f", {dataset['split']}" if dataset["split"] else "")
            + f", {dataset['images']} images; {report['missing_predictions']} without a prediction)")
    return "\n".join([head, *tables])
