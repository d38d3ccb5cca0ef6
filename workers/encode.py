"""Encode one generated sample into the bytes the shard stores: the image (jpg/png/webp) and ``mask.png``, an 8-bit
single-channel label map (0 background, the sample's class ids on their objects, 255 ignore). Same arrays + same
config -> same bytes."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.records import FAILED, IGNORE_LABEL, SUCCESS, SampleOutcome, SampleSpec, sample_metadata

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
    """A failed sample (``error`` set, or no image/mask) keeps its metadata for the parquet but stores no bytes."""
    if error is None and (image is None or labels is None):
        error = "missing output: generation returned no image or no mask"
    if error is not None:
        return SampleOutcome(spec, FAILED, error, None, None, sample_metadata(spec, config, None, mask_stats))
    _check_arrays(spec, image, labels)
    height, width = image.shape[:2]
    return SampleOutcome(
        spec,
        SUCCESS,
        None,
        encode_image(image, config.image_format, config.image_quality),
        encode_mask(labels),
        sample_metadata(spec, config, (width, height), mask_stats),
    )


def _check_arrays(spec: SampleSpec, image: np.ndarray, labels: np.ndarray) -> None:
    where = f"sample {spec.key}"
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    if labels.dtype != np.uint8 or labels.shape != image.shape[:2]:
        raise ValueError(f"{where}: mask: expected {image.shape[:2]} uint8 labels, got {labels.shape} {labels.dtype}")
    allowed = {0, IGNORE_LABEL, *(c.class_id for c in spec.classes)}
    stray = sorted(set(np.unique(labels).tolist()) - allowed)
    if stray:
        raise ValueError(f"{where}: mask: values {stray} are neither 0, 255 nor the sample's class ids")
