"""Records of the data plane: which sample is which (``SampleSpec``, ``ShardSpec``), shard file names, per-sample
metadata, the per-shard parquet schema and shard stats. No torch."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import LabelledClass, ManifestRow
from seediff.schemas.prompts import RenderedPrompt, Template

KEY_DIGITS = 12  # 254 classes x 10^9 samples fit in 12 digits


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class SampleSpec:
    sample_id: int
    class_index: int  # position of the row in the manifest
    index_in_class: int  # position of the sample among its row's samples
    seed: int
    row: ManifestRow

    @property
    def key(self) -> str:
        return sample_key(self.sample_id)

    @cached_property
    def _rendered(self) -> tuple[RenderedPrompt, tuple[LabelledClass, ...]]:
        return self.row.render(self.seed)

    @property
    def prompt(self) -> RenderedPrompt:
        """The sample's prompt: a pure function of its row and seed."""
        return self._rendered[0]

    @property
    def classes(self) -> tuple[LabelledClass, ...]:
        """The classes the sample's prompt labels, in order of appearance (at least one)."""
        return self._rendered[1]

    @property
    def class_id(self) -> int:
        """The first labelled class: the sample's single ``cls`` for classification-style loaders."""
        return self.classes[0].class_id

    @property
    def where(self) -> str:
        """The sample, as messages about it name it."""
        return f"manifest line {self.row.line} (sample {self.sample_id})" if self.row.line else f"sample {self.sample_id}"

    def record(self, config: RunConfig) -> dict[str, Any]:
        """What only a generated sample's record holds: where it sits in the manifest and how it was sampled."""
        return {
            "class_index": self.class_index,
            "index_in_class": self.index_in_class,
            "negative_prompt": config.negative_prompt_of(self.row.negative_prompt),
            "scheduler": config.scheduler,
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "image_format": config.image_format,
            "image_quality": config.image_quality,
        }


@dataclass(frozen=True)
class InputSpec:
    """A sample to label (``seediff annotate``): its id and seed (the noise added to its latents), the input unit and
    position it is read from, and the classes and prompt it is labelled with (``prompt``: the prompt template
    listing the classes, or its caption). The same ``key``/``prompt``/``classes`` as a ``SampleSpec``."""

    sample_id: int
    seed: int
    unit: int  # index of the input unit (tar or file) in the input
    index_in_unit: int
    template: Template
    labelled: tuple[LabelledClass, ...]  # every class the prompt labels, in order of first use
    source_url: str | None = None  # the input tar or file it is read from
    source_key: str | None = None  # its key in the input (a tar's __key__; eval: the image id)

    key = SampleSpec.key
    class_id = SampleSpec.class_id

    @cached_property
    def prompt(self) -> RenderedPrompt:
        return self.template.render(self.seed)

    @property
    def classes(self) -> tuple[LabelledClass, ...]:
        by_name = {c.name: c for c in self.labelled}
        return tuple(by_name[name] for name in self.prompt.class_names)

    @property
    def where(self) -> str:
        return f"{self.source_url}" + ("" if self.source_key is None else f": sample {self.source_key}")

    def record(self, config: RunConfig) -> dict[str, Any]:
        """What only an annotated sample's record holds: where the input came from and the noise levels its
        attention was read at (one UNet call each); its image field comes with its fields (``InputSample.record``)."""
        return {"source_url": self.source_url, "source_key": self.source_key, "index_in_unit": self.index_in_unit,
                "timesteps": list(config.annotate.timesteps)}


@dataclass(frozen=True)
class ShardSpec:
    """What travels to an actor: the shard id and its sample ids as one ``range`` (start, stop, step; see
    pipeline/plan.py for the layouts). The actor expands the ids into SampleSpecs from the plan it holds
    (``Plan.samples``), so the driver's memory is O(shards), never O(samples)."""

    shard_id: int
    start: int  # first sample id
    stop: int  # bound of the ids, exclusive
    step: int = 1  # 1: a contiguous range; the shard count: interleaved

    @property
    def ids(self) -> range:
        """The shard's sample ids, in the order its tar holds them."""
        return range(self.start, self.stop, self.step)

    def __len__(self) -> int:
        return len(self.ids)


# ---- the sample's fields --------------------------------------------------------------------------------------------

# The image fields a sample may hold, in webdataset's order of preference: a sample with several is labelled from,
# checksummed as and read back as the first it holds (``image_field``). Generate writes jpg, png or webp.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MASK_FIELD = "mask.png"  # the label map
ANNOTATION_FIELD = "mask.json"  # annotate's record (the input's own json passes through untouched)
CROSS_FIELD = "cross.png"  # annotate, on request: the plain cross-attention label map eval compares against


def image_field(fields: dict[str, Any]) -> str | None:
    """The field holding the image a sample is labelled from: the first of ``IMAGE_FIELDS`` it holds."""
    return next((name for name in IMAGE_FIELDS if name in fields), None)


# ---- the mask.png field ------------------------------------------------------------------------------------------

BACKGROUND_LABEL = 0
IGNORE_LABEL = 255  # uncertain pixels, skipped by trainers (ignore_index=255); class ids are 1..254


def sample_classes(metadata: dict[str, Any]) -> dict[int, str]:
    """class id -> name of the classes a sample labels, from its ``json`` record: the ids its mask may hold besides 0
    and 255 (datasets written before scenes have only ``class_id``/``class_name``; none: no class named)."""
    if "classes" in metadata:
        return {int(c["class_id"]): c["class_name"] for c in metadata["classes"]}
    return {int(metadata["class_id"]): metadata["class_name"]} if "class_id" in metadata else {}


def decode_mask(data: bytes) -> np.ndarray:
    """``mask.png`` bytes -> H x W uint8 label map, exactly the written values."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            raise ValueError(f"mask.png: expected an 8-bit single-channel (L) image, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8).copy()


# ---- shard file names -------------------------------------------------------------------------------------------

TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
SHARD_SUFFIXES = (TAR_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX)
TEMP_MARKER = ".tmp-"
RUN_JSON = "run.json"
LEASE_JSON = "lease.json"  # which driver owns the output root now (pipeline/resume.py)
SIZES_JSON = "sizes.json"
DATASET_JSON = "dataset.json"


def shard_name(prefix: str, shard_id: int, digits: int) -> str:
    """``seediff-000003``: the shard's files are this name plus one of ``SHARD_SUFFIXES``."""
    return f"{prefix}-{shard_id:0{digits}d}"


def temp_name(basename: str, token: str) -> str:
    """Hidden name a local file is written under before its rename, e.g. ``.seediff-000003.tar.tmp-<token>``."""
    return f".{basename}{TEMP_MARKER}{token}"


def shard_file_pattern(prefix: str, digits: int) -> re.Pattern[str]:
    """Matches the basenames of a run's shard files and of their temp files.
    Groups: ``temp`` (the leading dot, when a temp file), ``shard`` (id digits), ``suffix``."""
    suffixes = "|".join(re.escape(s) for s in SHARD_SUFFIXES)
    return re.compile(
        rf"^(?P<temp>\.)?{re.escape(prefix)}-(?P<shard>\d{{{digits}}})(?P<suffix>{suffixes})"
        rf"(?(temp){re.escape(TEMP_MARKER)}[0-9a-f]+|)$"
    )


# ---- one attempted sample -----------------------------------------------------------------------------------------

SUCCESS = "success"
FAILED = "failed"

# The per-sample stages: only an error of one of these fails a sample alone (a failed row of a committed shard);
# any other error fails the whole shard, which is retried elsewhere and never commits with it.
PROMPT_STAGE = "prompt"  # the sample's prompt and its class tokens (a phrase past the text encoder's context)
IMAGE_STAGE = "image"  # reading or decoding the sample's input image (missing, truncated, undecodable)
SAFETY_STAGE = "safety"  # blanked by the model's safety checker
LABELS_STAGE = "labels"  # the sample's label map (values other than 0, its class ids and 255)
FIELDS_STAGE = "input fields"  # an annotated input's own fields (one already named like a field annotate adds)


class SampleFailure(ValueError):
    """An error of one sample in a named per-sample stage; ``str()`` is ``stage: message``, which the failure
    histogram keys on (``failure_reason``). The message names the sample's source (input URL and key, or sample)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


@dataclass(frozen=True)
class InputSample:
    """A sample to label (``seediff annotate``): its spec (id, seed, classes, prompt) and the input sample's
    fields exactly as read."""

    spec: InputSpec
    fields: dict[str, Any]  # field name -> bytes, plus webdataset's "__key__" / "__url__"
    error: str | None = None  # why the input could not be read (its image stage's failure message), else None

    @property
    def record(self) -> dict[str, Any]:
        """The input's own image format for the sample's record: its image field (``image_field``)."""
        return {"image_format": image_field(self.fields)}


@dataclass(frozen=True)
class SampleOutcome:
    """One attempted sample, encoded and ready for the shard writer."""

    spec: SampleSpec
    status: str  # SUCCESS | FAILED
    error: str | None
    image: bytes | None  # the stored image's bytes, None on failure
    mask: bytes | None  # encoded mask.png, None on failure
    metadata: dict[str, Any]  # the sample's record (the `json` field of generate, `mask.json` of annotate)
    fields: dict[str, bytes] = field(default_factory=dict)  # the tar sample: field name -> bytes (empty on failure)


def sample_metadata(
    spec: SampleSpec, config: RunConfig, size: tuple[int, int] | None, mask_stats: dict[str, Any]
) -> dict[str, Any]:
    """The JSON-able, wall-clock-free record of one sample. ``size`` is (width, height), None on failure.
    Mask settings are ``mask_<setting>``, mask statistics ``mask_stat_<name>`` so the two never collide; the one
    list, ``classes``, holds each labelled class of the sample: id, name, phrase, occurrences and, once masks exist,
    its numbers from ``mask_stats["classes"]`` (pixel fraction, score, seeds ...)."""
    width, height = size if size is not None else (None, None)
    class_stats = mask_stats.get("classes") or [{} for _ in spec.classes]
    spans = dict(spec.prompt.spans)
    record: dict[str, Any] = {
        "key": spec.key,
        "sample_id": spec.sample_id,
        "class_name": spec.classes[0].name,
        "class_id": spec.class_id,
        "prompt": spec.prompt.text,
        "seed": spec.seed,
        "model": config.model,
        "revision": config.revision,
        "family": config.family,
        "dtype": config.dtype,
        "resolution": config.resolution,
        "width": width,
        "height": height,
        "output_format": config.output_format,
        **spec.record(config),
    }
    for name, value in config.mask.model_dump(mode="json").items():
        record[f"mask_{name}"] = value
    for name, value in config.layers.model_dump(mode="json").items():  # the attention layers the mask was read from
        record[f"layers_{name}"] = value
    for name, value in sorted(mask_stats.items()):
        if name != "classes":
            record[f"mask_stat_{name}"] = _json_scalar(value, f"sample {spec.key}: mask_stats[{name!r}]")
    record["classes"] = [
        {
            **{k: _json_scalar(v, f"sample {spec.key}: mask_stats['classes'][{i}][{k!r}]") for k, v in stats.items()},
            "class_id": labelled.class_id,
            "class_name": labelled.name,
            "phrase": spec.prompt.text[slice(*spans[labelled.name][0])],
            "occurrences": len(spans[labelled.name]),
        }
        for i, (labelled, stats) in enumerate(zip(spec.classes, class_stats, strict=True))
    ]
    return record


def _json_scalar(value: Any, where: str) -> bool | int | float | str | None:
    """Plain JSON scalar from a Python or numpy scalar; non-finite floats become null (strict JSON has no NaN)."""
    if hasattr(value, "item") and callable(value.item):  # numpy / torch 0-d scalars
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"{where}: expected a number, string, bool or None, got {type(value).__name__}")


def metadata_json(metadata: dict[str, Any]) -> bytes:
    """Deterministic bytes of the sample's `json` field."""
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# ---- per-shard parquet ----------------------------------------------------------------------------------------------

QUALITY_COLUMNS = ("foreground_fraction", "ignore_fraction", "empty", "degenerate", "confidence")  # per-sample stats

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_bytes", pa.int64()),
        pa.field("mask_bytes", pa.int64()),
        pa.field("image_sha256", pa.string()),
        # sha256 of every other tar field's bytes; with image_sha256, `seediff verify` checks each stored byte
        pa.field("mask_sha256", pa.string()),
        pa.field("cls_sha256", pa.string()),
        pa.field("txt_sha256", pa.string()),
        pa.field("json_sha256", pa.string()),
        # label-map quality, for filtering without opening a tar (null for failed samples, lists in class order)
        pa.field("class_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("class_pixel_fractions", pa.list_(pa.float64())),
        pa.field("class_scores", pa.list_(pa.float64())),
        pa.field("class_seeds", pa.list_(pa.int64())),
        pa.field("foreground_fraction", pa.float64()),
        pa.field("ignore_fraction", pa.float64()),
        pa.field("empty", pa.bool_()),
        pa.field("degenerate", pa.bool_()),
        pa.field("confidence", pa.float64()),
    ]
)


def checksum_column(extension: str, fields: dict[str, Any]) -> str:
    """The parquet column holding the sha256 of a tar field of the sample whose fields are ``fields``: its image
    (``image_field``) -> image_sha256, ``mask.png`` -> mask_sha256, ``json`` -> json_sha256; other fields (a second
    image, annotate's ``mask.json``, an input's own fields) get names the schema lacks, so they are not
    checksummed."""
    if extension == image_field(fields):
        return "image_sha256"
    if extension == MASK_FIELD:
        return "mask_sha256"
    return f"{extension.replace('.', '_')}_sha256"


def quality_columns(metadata: dict[str, Any]) -> dict[str, Any]:
    """The label-map quality columns of the parquet from a sample's ``json`` record: what readers filter on."""
    classes = metadata.get("classes", [])
    return {
        "class_ids": [c["class_id"] for c in classes],
        "class_pixel_fractions": [c.get("pixel_fraction") for c in classes],
        "class_scores": [c.get("score") for c in classes],
        "class_seeds": [c.get("num_seeds") for c in classes],
        **{name: metadata.get(f"mask_stat_{name}") for name in QUALITY_COLUMNS},
    }


def parquet_row(outcome: SampleOutcome, shard_id: int, fields: dict[str, bytes] | None) -> dict[str, Any]:
    """The sample's parquet row; ``fields``: its tar fields (``SampleOutcome.fields``), None when it failed."""
    spec, image = outcome.spec, outcome.image
    fields = fields or {}
    checksums = {checksum_column(ext, fields): hashlib.sha256(data).hexdigest() for ext, data in fields.items()}
    quality = quality_columns(outcome.metadata)
    if outcome.status != SUCCESS:  # no mask: keep which classes were asked for, no numbers
        quality = {name: None for name in quality} | {"class_ids": quality["class_ids"]}
    return {
        "key": spec.key,
        "sample_id": spec.sample_id,
        "shard": shard_id,
        "class_name": spec.classes[0].name,
        "class_id": spec.class_id,
        "prompt": spec.prompt.text,
        "seed": spec.seed,
        "status": outcome.status,
        "error": outcome.error,
        "width": outcome.metadata.get("width"),
        "height": outcome.metadata.get("height"),
        "image_bytes": None if image is None else len(image),
        "mask_bytes": None if outcome.mask is None else len(outcome.mask),
        **{name: checksums.get(name) for name in PARQUET_SCHEMA.names if name.endswith("_sha256")},
        **quality,
    }


# ---- per-shard stats: the commit marker ---------------------------------------------------------------------------

MAX_FAILURE_REASONS = 32  # distinct reasons kept in the histogram; the rest are counted under "other"


def failure_reason(error: str) -> str:
    """Histogram bucket of an error message: its stage, the text before the first colon ("safety: blanked ..." ->
    "safety"; ``SampleFailure``)."""
    return error.split(":", 1)[0].strip()[:80] or "unknown"


def failure_histogram(errors: list[str]) -> dict[str, int]:
    counts = Counter(failure_reason(e) for e in errors)
    kept = dict(sorted(counts.most_common(MAX_FAILURE_REASONS - 1)))
    other = sum(counts.values()) - sum(kept.values())
    return kept | ({"other": other} if other else {})


@dataclass(frozen=True)
class ShardStats:
    """Contents of ``<shard>_stats.json``. The only per-shard file with wall-clock times and host names."""

    shard_id: int
    shard: str  # shard_name(...), no extension
    count: int  # attempted samples
    successes: int  # samples in the tar
    failures: int
    failures_by_reason: dict[str, int]
    tar_bytes: int
    parquet_bytes: int
    start_time: float  # unix seconds
    end_time: float
    duration_s: float
    host: str
    versions: dict[str, str | None]
    runtime: dict[str, Any]  # whatever the caller passed (timings, actor id, ...)
    # sha256 of the shard's files as published; None in stats written before they were recorded
    tar_sha256: str | None = None
    parquet_sha256: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "ShardStats":
        """Parse and check the fields; a ValueError names ``source`` and what is wrong."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        missing = sorted(name for name, f in known.items() if f.default is MISSING and name not in data)
        if missing:
            raise ValueError(f"{source}: missing fields: {', '.join(missing)}")
        wrong = sorted(name for name, kind in _STATS_TYPES.items() if name in data and not _is(data[name], kind))
        if wrong:
            raise ValueError(f"{source}: fields of the wrong type: {', '.join(wrong)}")
        return cls(**{k: data[k] for k in known if k in data})


# the fields readers compute with: a stats file with another type there does not parse (no TypeError later)
_STATS_TYPES: dict[str, type | tuple[type, ...]] = {
    "shard_id": int, "shard": str, "count": int, "successes": int, "failures": int, "failures_by_reason": dict,
    "tar_bytes": int, "parquet_bytes": int, "start_time": (int, float), "end_time": (int, float),
    "duration_s": (int, float), "runtime": dict, "tar_sha256": (str, type(None)), "parquet_sha256": (str, type(None)),
}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)
