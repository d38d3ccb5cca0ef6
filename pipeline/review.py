"""Looking at a finished (or running) output: ``inspect`` (what is there), ``preview`` (a contact sheet of images with
their masks); ``verify`` is pipeline/verify.py. All I/O goes through fsspec, so the same calls work on local disk,
``s3://`` and ``gs://``."""

from __future__ import annotations

import colorsys
import io
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from seediff.pipeline import fonts
from seediff.pipeline.plan import shard_count
from seediff.pipeline.readers import MASK_FIELD, raw_samples, sample_record
from seediff.schemas.records import IMAGE_FIELDS
from seediff.pipeline.kinds import CLASS_NAMES_FIELD, kind_of
from seediff.pipeline.resume import read_committed_stats, read_run_json
from seediff.pipeline.summary import human_bytes
from seediff.schemas.config import InputError, RunConfig, flatten_settings
from seediff.schemas.records import (
    PARQUET_SUFFIX,
    RUN_JSON,
    SUCCESS,
    TAR_SUFFIX,
    shard_name,
)
from seediff.schemas.records import BACKGROUND_LABEL as BACKGROUND
from seediff.schemas.records import IGNORE_LABEL as IGNORE
from seediff.schemas.records import decode_mask, sample_classes
from seediff.storage import output_fs

OVERLAY_ALPHA = 0.5
IGNORE_COLOUR = (255, 255, 255)  # the ignore band: white, unlike any class colour (saturation 0.9)
LEGEND_ROW = 14  # px per legend line under the sheet
LEGEND_FONT = 10  # px


# ---- shared: the run's config and files -------------------------------------------------------------------------


def read_run(out_url: str) -> tuple[dict[str, Any], RunConfig]:
    """run.json and its config, with output_url pointing where the data is now (it may have moved)."""
    record = read_run_json(out_url)
    if record is None:
        raise FileNotFoundError(f"{out_url.rstrip('/')}/{RUN_JSON}: missing; not a seediff output root")
    config = RunConfig.recorded(record, out_url)
    return record, config


def _read_parquets(
    out_url: str, config: RunConfig, shard_ids: list[int], columns: tuple[str, ...] | None = None
) -> dict[int, Any]:
    """shard id -> its parquet table, for the given committed shards: ``columns`` (default all) among those the
    shard's parquet has (outputs written before the per-class columns lack them)."""
    fs, root = output_fs(out_url)
    tables = {}
    for shard_id in shard_ids:
        path = f"{root}/{shard_name(config.shard_prefix, shard_id, config.shard_digits)}{PARQUET_SUFFIX}"
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f, pre_buffer=False)
                present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                # Decoded on this thread: a task of Arrow's thread pool can release its hold on this Python file's
                # buffers after the read has returned, and one released during interpreter shutdown cannot take the
                # GIL, so the process aborts (std::terminate in ~PyBuffer: `seediff inspect` exiting 134).
                tables[shard_id] = parquet.read(columns=present, use_threads=False)
        except (pa.ArrowException, OSError) as e:  # a damaged committed parquet: verify's finding, not a traceback
            raise DamagedOutput(
                f"{path}: unreadable parquet ({type(e).__name__}: {str(e)[:200]}); `seediff verify --repair "
                f"{out_url}` un-commits the damaged shards, and the next run regenerates them"
            ) from e
    return tables


class DamagedOutput(InputError):
    """A committed file of the output cannot be read (the QA commands report it in one line, exit 2)."""


def run_class_names(record: dict[str, Any]) -> dict[int, str]:
    """class id -> name: the class table run.json records (``class_names``); annotate runs recorded before it have
    their ``classes`` list (id = position + 1), older generate runs nothing (empty)."""
    if CLASS_NAMES_FIELD in record:
        return {int(class_id): name for class_id, name in record[CLASS_NAMES_FIELD].items()}
    if isinstance(record.get("classes"), list):
        return dict(enumerate(record["classes"], start=1))
    return {}


# ---- inspect ------------------------------------------------------------------------------------------------------

CLASS_COLUMNS = ("shard", "status", "class_id", "class_name", "class_ids", "class_pixel_fractions")


def inspect_dataset(out_url: str) -> dict[str, Any]:
    """Counts and settings of an output root, from run.json, the shard stats and the shard parquets."""
    record, config = read_run(out_url)
    kind = kind_of(config)
    input_fields = {k: record.get(k) for k in kind.input_fields}
    stats = read_committed_stats(config)
    tables = _read_parquets(out_url, config, sorted(stats), CLASS_COLUMNS)
    failures_by_reason: Counter = Counter()
    for s in stats.values():
        failures_by_reason.update(s.failures_by_reason)
    expected_shards = shard_count(record.get("num_samples", 0), config.samples_per_shard)
    tar_bytes = sum(s.tar_bytes for s in stats.values())
    parquet_bytes = sum(s.parquet_bytes for s in stats.values())
    return {
        "out_url": out_url,
        "model": config.model,
        "revision": config.revision,
        "planned_samples": record.get("num_samples"),
        "samples": sum(s.successes for s in stats.values()),
        "attempted": sum(s.count for s in stats.values()),
        "failures": sum(s.failures for s in stats.values()),
        "failures_by_reason": dict(sorted(failures_by_reason.items())),
        "shards": len(stats),
        "expected_shards": expected_shards,
        "missing_shards": [i for i in range(expected_shards) if i not in stats],
        "classes": class_counts(out_url, config, run_class_names(record), list(tables.values())),
        "bytes": {"tar": tar_bytes, "parquet": parquet_bytes, "total": tar_bytes + parquet_bytes},
        "settings": {k: v for k, v in config.model_dump(mode="json").items() if k != "output_url"},
        "kind": kind.name,
        "input": input_fields,
        "input_summary": kind.input_summary(input_fields),
    }


@dataclass
class _ClassCount:
    samples: int = 0  # successful samples that label the class
    failures: int = 0  # failed samples that were to label it
    fractions: list[float] = field(default_factory=list)  # of each successful sample's pixels labelled with it


def class_counts(out_url: str, config: RunConfig, names: dict[int, str], tables: list[Any]) -> list[dict[str, Any]]:
    """Per class, by id: its name, the samples that label it (every class of a scene sample, not just its first),
    the failed samples that were to, and its mean pixel fraction over the samples that label it (None where the
    parquets do not record it). ``names``: the run's class table (``run_class_names``); each of its classes is
    listed, labelled by samples or not."""
    names = dict(names)
    counts: dict[int, _ClassCount] = {class_id: _ClassCount() for class_id in names}
    shard_of: dict[int, int] = {}  # class id -> a shard with a sample labelling it, to name it from its records
    for table in tables:
        for row in table.to_pylist():
            names.setdefault(row["class_id"], row["class_name"])  # a row names its first class
            fractions = row.get("class_pixel_fractions") or []
            for k, class_id in enumerate(row.get("class_ids") or [row["class_id"]]):
                count = counts.setdefault(class_id, _ClassCount())
                if row["status"] != SUCCESS:
                    count.failures += 1
                    continue
                count.samples += 1
                shard_of.setdefault(class_id, row["shard"])
                if k < len(fractions) and fractions[k] is not None:
                    count.fractions.append(fractions[k])
    unnamed = {class_id: shard for class_id, shard in shard_of.items() if class_id not in names}
    if unnamed:  # an output whose run.json predates the class table: its other names are in the sample records
        names.update(_names_from_records(out_url, config, unnamed))
    return [
        {"class_id": class_id, "class_name": names.get(class_id, f"class {class_id}"), "samples": c.samples,
         "failures": c.failures, "pixel_fraction": sum(c.fractions) / len(c.fractions) if c.fractions else None}
        for class_id, c in sorted(counts.items())
    ]


def _names_from_records(out_url: str, config: RunConfig, shards: dict[int, int]) -> dict[int, str]:
    """Names of the classes ``shards`` (class id -> a shard holding it) from the json records of those shards."""
    urls = [f"{out_url.rstrip('/')}/{shard_name(config.shard_prefix, i, config.shard_digits)}{TAR_SUFFIX}"
            for i in sorted(set(shards.values()))]
    found: dict[int, str] = {}
    for sample in raw_samples(urls):
        found.update(sample_classes(sample_record(sample)))
        if shards.keys() <= found.keys():
            break
    return found


def format_inspection(info: dict[str, Any]) -> str:
    """The inspect dict as a short human-readable report."""
    lines = [
        f"output     {info['out_url']}",
        f"model      {info['model']}" + (f" @ {info['revision']}" if info["revision"] else ""),
        f"samples    {info['samples']} written, {info['failures']} failed, {info['attempted']} attempted "
        f"of {info['planned_samples']} planned",
        f"shards     {info['shards']} of {info['expected_shards']} committed"
        + (f" (missing: {_id_list(info['missing_shards'])})" if info["missing_shards"] else ""),
        f"bytes      {human_bytes(info['bytes']['total'])} (tar {human_bytes(info['bytes']['tar'])}, "
        f"parquet {human_bytes(info['bytes']['parquet'])})",
        f"input      {info['input_summary']}",
    ]
    if info["failures_by_reason"]:
        lines.append("failures   " + ", ".join(f"{k}: {v}" for k, v in info["failures_by_reason"].items()))
    lines.append("classes    (id, name, samples that label it, its mean pixel fraction in them)")
    width = max((len(c["class_name"]) for c in info["classes"]), default=0)
    for c in info["classes"]:
        fraction = "-" if c["pixel_fraction"] is None else f"{c['pixel_fraction']:.3f}"
        lines.append(f"  {c['class_id']:>3}  {c['class_name']:<{width}}  {c['samples']:>8}  {fraction:>6}"
                     + (f"  ({c['failures']} failed)" if c["failures"] else ""))
    lines.append("settings")
    for key, value in sorted(flatten_settings(info["settings"]).items()):
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def _id_list(ids: list[int], most: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > most else "")


# ---- preview ------------------------------------------------------------------------------------------------------


def preview_grid(out_url: str, path: str, n: int = 64, class_name: str | None = None, cell: int = 128) -> tuple[int, int]:
    """Write a PNG contact sheet of the first ``n`` samples (of those labelling ``class_name`` when given) to ``path``
    (any fsspec URL): each cell is the image with each class overlaid in its colour and the ignore band in
    ``IGNORE_COLOUR``, captioned with the sample's class names; a legend under the grid names every colour shown.
    Returns the sheet's (width, height): ``ceil(sqrt(k))`` columns of ``cell`` px for the ``k <= n`` samples found,
    plus ``LEGEND_ROW`` px per legend line."""
    if n < 1 or cell < 16:
        raise ValueError(f"preview: n must be >= 1 and cell >= 16, got n={n}, cell={cell}")
    samples = list(_first_samples(out_url, n, class_name))
    if not samples:
        which = f" of class {class_name!r}" if class_name else ""
        raise ValueError(f"{out_url}: no samples{which} to preview")
    cells = [render_overlay(sample, cell) for sample in samples]
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    entries = _legend_entries(samples)
    lines = _legend_lines(entries, cols * cell)
    sheet = Image.new("RGB", (cols * cell, rows * cell + LEGEND_ROW * len(lines)), "black")
    for i, tile in enumerate(cells):
        sheet.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    _draw_legend(sheet, lines, rows * cell)
    fs, fs_path = output_fs(path)
    with fs.open(fs_path, "wb") as f:
        sheet.save(f, format="PNG")
    return sheet.size


def _first_samples(out_url: str, n: int, class_name: str | None) -> Iterator[dict[str, Any]]:
    taken = 0
    for sample in raw_samples(out_url):
        if class_name is not None and class_name not in sample_classes(sample_record(sample)).values():
            continue
        yield sample
        taken += 1
        if taken == n:
            return


def _legend_entries(samples: list[dict[str, Any]]) -> list[tuple[tuple[int, int, int], str]]:
    names: dict[int, str] = {}
    for sample in samples:
        names.update(sample_classes(sample_record(sample)))
    return [(class_colour(i), f"{i} {names[i]}") for i in sorted(names)] + [(IGNORE_COLOUR, f"{IGNORE} ignore")]


def _legend_lines(entries: list[tuple[tuple[int, int, int], str]], width: int) -> list[list[tuple[Any, str]]]:
    """Entries packed left to right into lines of the sheet's width."""
    lines: list[list[tuple[Any, str]]] = [[]]
    used = 0
    for colour, text in entries:
        size = _legend_width(text)
        if lines[-1] and used + size > width:
            lines.append([])
            used = 0
        lines[-1].append((colour, text))
        used += size
    return lines


def _legend_width(text: str) -> int:
    """Swatch, gap, the text (pipeline/fonts.py, any script), gap."""
    return 14 + fonts.label_size(text, LEGEND_FONT)[0] + 10


def _draw_legend(sheet: Image.Image, lines: list[list[tuple[Any, str]]], top: int) -> None:
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(lines):
        x, y = 2, top + row * LEGEND_ROW
        for colour, text in line:
            draw.rectangle((x, y + 2, x + 9, y + 11), fill=colour)
            fonts.draw_label(draw, (x + 13, y + 1), text, LEGEND_FONT)
            x += _legend_width(text)


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A distinct saturated colour per class id (golden-ratio hue steps), stable across runs."""
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.9, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def render_overlay(sample: dict[str, Any], cell: int) -> Image.Image:
    image_field = next(f for f in IMAGE_FIELDS if f in sample)
    with Image.open(io.BytesIO(sample[image_field])) as im:
        rgb = np.asarray(im.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR), dtype=np.float32)
    labels = np.asarray(Image.fromarray(decode_mask(sample[MASK_FIELD])).resize((cell, cell), Image.Resampling.NEAREST))
    meta = sample_record(sample)
    overlay = rgb.copy()
    for value in np.unique(labels):
        if value == BACKGROUND:
            continue
        colour = IGNORE_COLOUR if value == IGNORE else class_colour(int(value))
        overlay[labels == value] = np.asarray(colour, dtype=np.float32)
    blended = np.where((labels != BACKGROUND)[..., None], (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * overlay, rgb)
    tile = Image.fromarray(blended.round().astype(np.uint8))
    _label(tile, ", ".join(sample_classes(meta).values()))
    return tile


def _label(tile: Image.Image, text: str) -> None:
    """The class name on a black band, in fonts that have its script's glyphs (pipeline/fonts.py)."""
    draw = ImageDraw.Draw(tile)
    size = max(10, tile.height // 12)
    width, height = fonts.label_size(text, size)
    draw.rectangle((0, 0, width + 4, height + 4), fill=(0, 0, 0))
    fonts.draw_label(draw, (2, 2), text, size)

