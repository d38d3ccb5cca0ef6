"""Encode one sample into the fields the shard stores: a generated sample's image (jpg/png/webp), or an annotated
sample's own fields, and ``mask.png``, an 8-bit single-channel label map (0 background, the sample's class ids on
their objects, 255 ignore). Same arrays + same config -> same bytes."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.records import (
    ANNOTATION_FIELD,
    CROSS_FIELD,
    FAILED,
    IGNORE_LABEL,
    LABELS_STAGE,
    MASK_FIELD,
    SUCCESS,
    InputSample,
    SampleFailure,
    SampleOutcome,
    SampleSpec,
    metadata_json,
    sample_metadata,
)

# Image fields an input sample of annotate may hold, in the order one is taken as the image (webdataset's names).
INPUT_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
# Pillow format names and save options per config.image_format; nothing here depends on time or the machine.
_IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    options: dict[str, Any] = {"format": _IMAGE_FORMATS[image_format]}
    if image_format in ("jpg", "webp"):
        options["quality"] = quality
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, **options)
    return buf.getvalue()


def encode_mask(labels: np.ndarray) -> bytes:
    """uint8 label map -> PNG (mode ``L``), exactly these values."""
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(
    spec: SampleSpec,
    image: np.ndarray | None,
    labels: np.ndarray | None,
    mask_stats: dict[str, Any],
    error: str | None,
    config: RunConfig,
) -> SampleOutcome:
    """A generated sample's fields: the image, ``mask.png``, ``cls`` (the first class), ``txt`` (the prompt) and
    ``json`` (the record). A failed sample (``error`` set, or no image/mask) keeps its metadata for the parquet but
    stores no bytes."""
    if error is None and (image is None or labels is None):
        error = "missing output: generation returned no image or no mask"
    if error is not None:
        return SampleOutcome(spec, FAILED, error, None, None, sample_metadata(spec, config, None, mask_stats))
    _check_labels(spec, labels, image.shape[:2])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {spec.key}: image: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    image_bytes, mask = encode_image(image, config.image_format, config.image_quality), encode_mask(labels)
    metadata = sample_metadata(spec, config, (width, height), mask_stats)
    fields = {
        config.image_format: image_bytes,
        MASK_FIELD: mask,
        "cls": str(spec.class_id).encode("ascii"),
        "txt": spec.prompt.text.encode("utf-8"),
        "json": metadata_json(metadata),
    }
    return SampleOutcome(spec, SUCCESS, None, image_bytes, mask, metadata, fields)


def encode_annotated(
    sample: InputSample,
    labels: np.ndarray | None,
    cross_labels: np.ndarray | None,
    mask_stats: dict[str, Any],
    error: str | None,
    config: RunConfig,
) -> SampleOutcome:
    """An annotated sample's fields: every field of the input sample byte for byte, plus ``mask.png`` (the label
    map at the image's own size), ``mask.json`` (the record, with where the sample came from) and, when made,
    ``cross.png``. An input that already holds one of those fields fails rather than lose it."""
    spec = sample.spec
    kept = {name: value for name, value in sample.fields.items() if not name.startswith("__")}
    source = {"source_key": sample.fields.get("__key__"), "source_url": sample.fields.get("__url__")}
    clash = sorted(set(kept) & {MASK_FIELD, ANNOTATION_FIELD, CROSS_FIELD})
    if error is None and clash:
        error = f"input fields: the input sample already has {', '.join(clash)}"
    if error is None and labels is None:
        error = "missing output: annotation returned no mask"
    if error is not None:
        return SampleOutcome(spec, FAILED, error, None, None, {**sample_metadata(spec, config, None, mask_stats), **source})
    _check_labels(spec, labels, labels.shape)
    height, width = labels.shape
    metadata = {**sample_metadata(spec, config, (width, height), mask_stats), **source}
    mask = encode_mask(labels)
    fields = {**kept, MASK_FIELD: mask, ANNOTATION_FIELD: metadata_json(metadata)}
    if cross_labels is not None:
        _check_labels(spec, cross_labels, labels.shape)
        fields[CROSS_FIELD] = encode_mask(cross_labels)
    image = next(kept[name] for name in INPUT_IMAGE_FIELDS if name in kept)
    return SampleOutcome(spec, SUCCESS, None, image, mask, metadata, fields)


def _check_labels(spec: SampleSpec, labels: np.ndarray, shape: tuple[int, ...]) -> None:
    where = f"sample {spec.key}"
    if labels.dtype != np.uint8 or labels.shape != tuple(shape):
        raise ValueError(f"{where}: mask: expected {tuple(shape)} uint8 labels, got {labels.shape} {labels.dtype}")
    allowed = {0, IGNORE_LABEL, *(c.class_id for c in spec.classes)}
    stray = sorted(set(np.unique(labels).tolist()) - allowed)
    if stray:
        raise SampleFailure(LABELS_STAGE, f"{where}: mask: values {stray} are neither 0, 255 nor the sample's class ids")
