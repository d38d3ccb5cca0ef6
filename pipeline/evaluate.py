"""Scoring label maps against a labelled dataset: one confusion matrix per method (the SeeDiff label maps in
``mask.png`` and, when the output has them, the plain cross-attention maps in ``cross.png``), accumulated over every
shard of the predictions' output root, then reported as ``metrics.json`` and a table.

Predictions are matched to ground truth by sample key = image id (``seediff annotate`` keys the samples of a
labelled dataset by image id; ``seediff export`` names images by sample key). An image without a prediction (a
failed sample) counts as predicted 255 everywhere, so failures lower the scores instead of vanishing from them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from seediff.pipeline.layouts import LabelledDataset, LayoutError, iter_labelled, read_label_map
from seediff.pipeline.metrics import IGNORE, ConfusionMatrix, format_table
from seediff.pipeline.readers import raw_samples, sample_record
from seediff.pipeline.sources import InputUnit
from seediff.schemas.records import CROSS_FIELD, MASK_FIELD, decode_mask
from seediff.storage import output_fs, write_file

METHODS = {"seediff": MASK_FIELD, "cross_attention": CROSS_FIELD}
METRICS_JSON = "metrics.json"


def known_classes(dataset: LabelledDataset) -> tuple[list[InputUnit], list[str]]:
    """The "known classes" protocol of training-free segmenters: each image is labelled with the classes its
    ground truth holds (not 0, not 255). Returns the annotate units (key = image id) and the ids of the images
    without any class, which are scored as all background without running the model."""
    units, background_only = [], []
    names = dataset.class_names
    for item, target in iter_labelled(dataset):
        ids = sorted(set(np.unique(target).tolist()) - {0, IGNORE})
        if ids and ids[-1] >= len(names):
            raise LayoutError(f"{item.label}: label {ids[-1]} outside the {len(names)} classes of the class list")
        _check_image_size(item.image, item.label, target)
        if ids:
            units.append(InputUnit(item.image, "file", 1, tuple(names[i] for i in ids), item.name))
        else:
            background_only.append(item.name)
    return units, background_only


def _check_image_size(image_url: str, label_url: str, target: np.ndarray) -> None:
    """The ground truth must cover its image pixel for pixel: checked from the image's header, before any model
    loads (scoring would otherwise fail only after the model ran)."""
    with fsspec.open(image_url, "rb") as f, Image.open(f) as im:
        width, height = im.size
    if target.shape != (height, width):
        raise LayoutError(f"{label_url}: the ground truth is {target.shape[1]}x{target.shape[0]} but its image "
                          f"{image_url} is {width}x{height}")


def score_predictions(dataset: LabelledDataset, predictions: str | None,
                      background_only: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of the output root ``predictions`` on ``dataset``: the SeeDiff ones at the top level, the
    cross-attention ones under ``cross_attention`` (absent when the output has no ``cross.png``). Images named in
    ``background_only`` are scored as predicted background (no class to look for)."""
    names = dataset.class_names
    matrices = {method: ConfusionMatrix(len(names)) for method in METHODS}
    wanted = {item.name: item for item in dataset.images}
    scored: set[str] = set()
    methods_seen: set[str] = set()
    for name in background_only:
        target = read_label_map(wanted[name].label)
        for matrix in matrices.values():
            matrix.update(target, np.zeros_like(target))
        scored.add(name)
    for sample in raw_samples(predictions) if predictions else ():
        key = source_key(sample)
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


def source_key(sample: dict[str, Any]) -> str:
    """The input's own key of an annotated sample (recorded in ``mask.json``), else the sample's key."""
    return sample_record(sample).get("source_key") or sample["__key__"]


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
