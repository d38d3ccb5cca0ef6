"""Encode one generated sample into the bytes the shard stores: the image (jpg/png/webp) and ``mask.png``, an 8-bit
single-channel label map (0 background, the class id on the object). Same arrays + same config -> same bytes."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.records import FAILED, SUCCESS, SampleOutcome, SampleSpec, sample_metadata

# Pillow format names and save options per config.image_format; nothing here depends on time or the machine.
_IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    options: dict[str, Any] = {"format": _IMAGE_FORMATS[image_format]}
    if image_format in ("jpg", "webp"):
        options["quality"] = quality
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, **options)
    return buf.getvalue()


def encode_mask(mask: np.ndarray, class_id: int) -> bytes:
    """Boolean foreground -> PNG label map (mode ``L``): ``class_id`` on the object, 0 elsewhere."""
    labels = np.where(mask, np.uint8(class_id), np.uint8(0))
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(
    spec: SampleSpec,
    image: np.ndarray | None,
    mask: np.ndarray | None,
    mask_stats: dict[str, Any],
    error: str | None,
    config: RunConfig,
) -> SampleOutcome:
    """A failed sample (``error`` set, or no image/mask) keeps its metadata for the parquet but stores no bytes."""
    if error is None and (image is None or mask is None):
        error = "missing output: generation returned no image or no mask"
    if error is not None:
        return SampleOutcome(spec, FAILED, error, None, None, sample_metadata(spec, config, None, mask_stats))
    _check_arrays(spec, image, mask)
    height, width = image.shape[:2]
    return SampleOutcome(
        spec,
        SUCCESS,
        None,
        encode_image(image, config.image_format, config.image_quality),
        encode_mask(mask, spec.row.class_id),
        sample_metadata(spec, config, (width, height), mask_stats),
    )


def _check_arrays(spec: SampleSpec, image: np.ndarray, mask: np.ndarray) -> None:
    where = f"sample {spec.key}"
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
    if mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
        raise ValueError(f"{where}: mask: expected {image.shape[:2]} bool, got {mask.shape} {mask.dtype}")
