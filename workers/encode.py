"""Encode one labelled sample into the fields the shard stores: what its kind stores of its own (``SampleImage``: a
generated image with ``cls`` and ``txt``, or an annotated input's own fields), ``mask.png``, an 8-bit single-channel
label map (0 background, the sample's class ids on their objects, 255 ignore), any further label map its kind makes,
and the record. Same arrays + same config -> same bytes."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.records import (
    ANNOTATION_FIELD,
    CROSS_FIELD,
    FAILED,
    FIELDS_STAGE,
    IGNORE_LABEL,
    LABELS_STAGE,
    MASK_FIELD,
    SUCCESS,
    InputSample,
    InputSpec,
    SampleFailure,
    SampleOutcome,
    SampleSpec,
    image_field,
    metadata_json,
    sample_metadata,
)

# Pillow format names and save options per config.image_format; nothing here depends on time or the machine.
_IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class SampleImage(Protocol):
    """A sample's image as its kind stores it, with what else only its kind stores: ``spec``; ``size`` (width,
    height) its label maps are stored at, None when it has none (it failed before); ``record_field`` (the field its
    record goes in) and ``record`` (the record's entries only the kind knows); ``fields(config)``: the fields stored
    besides the label maps and the record (a ``SampleFailure`` there fails the sample alone). Two kinds:
    ``GeneratedImage`` and ``InputImage``."""

    spec: SampleSpec | InputSpec
    record_field: str

    @property
    def size(self) -> tuple[int, int] | None: ...

    @property
    def record(self) -> dict[str, Any]: ...

    def fields(self, config: RunConfig) -> dict[str, bytes]: ...


@dataclass
class LabelledSample:
    """One sample of a batch through the label step (``workers/batch.label_batch``): its image, its label maps at
    ``image.size`` and their stats, or why it failed (then no label maps, no stats)."""

    image: SampleImage
    labels: np.ndarray | None = None  # H x W uint8 (mask.png): 0 background, the sample's class ids, 255 ignore
    extra_labels: dict[str, np.ndarray] = field(default_factory=dict)  # field -> further label map its kind makes
    mask_stats: dict[str, Any] = field(default_factory=dict)  # label_maps' stats: flat numbers plus "classes"
    error: str | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """A generated sample as it is stored: its image, encoded here (in the actor's encode threads, off the batch's),
    ``cls`` (its first class), ``txt`` (its prompt); its record, all the spec's (``SampleSpec.record``), in
    ``json``."""

    spec: SampleSpec
    rgb: np.ndarray | None = None  # H x W x 3 uint8 RGB; None when it failed
    record_field: ClassVar[str] = "json"

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.rgb is None else (self.rgb.shape[1], self.rgb.shape[0])

    @property
    def record(self) -> dict[str, Any]:
        return {}

    def fields(self, config: RunConfig) -> dict[str, bytes]:
        rgb = self.rgb
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"sample {self.spec.key}: image: expected H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
        return {
            config.image_format: encode_image(rgb, config.image_format, config.image_quality),
            "cls": str(self.spec.class_id).encode("ascii"),
            "txt": self.spec.prompt.text.encode("utf-8"),
        }


@dataclass(frozen=True)
class InputImage:
    """An input sample as annotate stores it: every field of the input byte for byte, its label maps at the decoded
    image's own size, its record in ``mask.json`` with the input's image format (``InputSample.record``)."""

    sample: InputSample
    size: tuple[int, int] | None = None  # (width, height) of the decoded image; None when it could not be read
    record_field: ClassVar[str] = ANNOTATION_FIELD

    @property
    def spec(self) -> InputSpec:
        return self.sample.spec

    @property
    def record(self) -> dict[str, Any]:
        return self.sample.record

    def fields(self, config: RunConfig) -> dict[str, bytes]:
        """The input's own fields; one that already holds a field annotate adds fails rather than lose it."""
        kept = {name: value for name, value in self.sample.fields.items() if not name.startswith("__")}
        clash = sorted(set(kept) & {MASK_FIELD, ANNOTATION_FIELD, CROSS_FIELD})
        if clash:
            raise SampleFailure(FIELDS_STAGE, f"the input sample already has {', '.join(clash)}")
        return kept


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


def encode_sample(sample: LabelledSample, config: RunConfig) -> SampleOutcome:
    """The sample's fields: its kind's own (``SampleImage.fields``), ``mask.png``, its record in its kind's record
    field, and any further label map. A failed sample (``error`` set, or a per-sample stage failing here) keeps its
    metadata for the parquet but stores no bytes; any other error is the shard's, and so is a sample with neither an
    error nor its image and mask: no per-sample stage failed it, so no failed row may stand for it."""
    image, error = sample.image, sample.error
    if error is None and (sample.labels is None or image.size is None):
        raise RuntimeError(f"sample {image.spec.key}: the batch returned no image or no mask and no per-sample error")
    if error is None:
        try:
            return _stored(sample, config)
        except SampleFailure as failure:  # its label map or its own fields: the sample's own failure
            error = str(failure)
    return SampleOutcome(image.spec, FAILED, error, None, None, _record(sample, config, None))


def _stored(sample: LabelledSample, config: RunConfig) -> SampleOutcome:
    image = sample.image
    own = image.fields(config)
    width, height = image.size
    maps = {MASK_FIELD: sample.labels, **sample.extra_labels}
    for labels in maps.values():
        _check_labels(image.spec, labels, (height, width))
    encoded = {name: encode_mask(labels) for name, labels in maps.items()}
    metadata = _record(sample, config, image.size)
    fields = {**own, MASK_FIELD: encoded.pop(MASK_FIELD), image.record_field: metadata_json(metadata), **encoded}
    return SampleOutcome(image.spec, SUCCESS, None, fields[image_field(fields)], fields[MASK_FIELD], metadata, fields)


def _record(sample: LabelledSample, config: RunConfig, size: tuple[int, int] | None) -> dict[str, Any]:
    return {**sample_metadata(sample.image.spec, config, size, sample.mask_stats), **sample.image.record}


def _check_labels(spec: SampleSpec | InputSpec, labels: np.ndarray, shape: tuple[int, int]) -> None:
    where = f"sample {spec.key}"
    if labels.dtype != np.uint8 or labels.shape != tuple(shape):
        raise ValueError(f"{where}: mask: expected {tuple(shape)} uint8 labels, got {labels.shape} {labels.dtype}")
    allowed = {0, IGNORE_LABEL, *(c.class_id for c in spec.classes)}
    stray = sorted(set(np.unique(labels).tolist()) - allowed)
    if stray:
        raise SampleFailure(LABELS_STAGE, f"{where}: mask: values {stray} are neither 0, 255 nor the sample's class ids")
