"""Manifest: the classes to generate, read from a table (CSV, TSV, JSONL, Parquet) or a text file, validated
before any model is loaded. Errors name the file, the line (or row) and the field.

Reading rules (``load_manifest``):

* The source is opened with fsspec, so local paths and any fsspec URL (``s3://``, ``gs://``, ``memory://`` ...)
  work. The format comes from the file name: ``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``,
  ``.txt``. ``Manifest.sha256`` is the sha256 of the source bytes.
* Parquet is read with pyarrow; "line" in messages is the 1-based row number. CSV, TSV and JSONL are parsed with
  the standard ``csv``/``json`` modules, because pyarrow's text readers skip blank lines and report no source
  line for most errors; this way "line" is the exact 1-based physical line, header counted.
* Text files hold one class name per line; blank lines and lines whose first non-blank character is ``#`` are
  skipped (a class name cannot start with ``#``); ``samples_per_class`` is required.
* Columns: ``class_name`` (required), ``num_samples`` (required unless ``samples_per_class`` is given),
  ``prompt``, ``class_id``, ``negative_prompt``. A value that is absent (no column, missing JSON key, empty cell,
  null) takes its default: ``samples_per_class`` for ``num_samples`` (so explicit counts always win over the flag),
  the row's 1-based position for ``class_id``, ``prompt_template`` for ``prompt``, ``""`` for ``negative_prompt``.
* A prompt containing ``{class_name}`` is a template: that placeholder (and nothing else) is replaced. Any other
  prompt is literal and must contain the class name, compared case-insensitively (``str.casefold``).
* Class names are stripped of surrounding whitespace; two names equal under ``casefold`` are duplicates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from seediff.schemas.config import DEFAULT_PROMPT_TEMPLATE, InputError

MAX_SAMPLES_PER_CLASS = 10**9
MAX_CLASS_ID = 254  # mask values are 8-bit: 0 = background, 255 = ignore
COLUMNS = ("class_name", "num_samples", "prompt", "class_id", "negative_prompt")
PLACEHOLDER = "{class_name}"
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".pq": "parquet", ".txt": "txt"}
_INTEGER = re.compile(r"[+-]?[0-9]+")


class ManifestError(InputError):
    """Bad manifest input. The message starts with ``<file>:<line>: <field>:`` where a line applies."""


@dataclass(frozen=True)
class ClassRow:
    class_name: str
    class_id: int  # 1..254 (0 = background, 255 = ignore in masks)
    num_samples: int
    prompt: str  # final prompt text (template already applied); always contains class_name
    negative_prompt: str  # "" when none
    line: int  # 1-based line (text/CSV/TSV/JSONL) or row number (Parquet) in the source, for messages


@dataclass(frozen=True)
class Manifest:
    source: str  # path or URL as given
    rows: tuple[ClassRow, ...]
    sha256: str  # of the source bytes, recorded in dataset metadata
    samples_per_class: int | None = None  # the count given for rows without num_samples, recorded for resume

    @property
    def num_samples(self) -> int:
        return sum(r.num_samples for r in self.rows)


def load_manifest(
    url: str | os.PathLike[str],
    *,
    samples_per_class: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> Manifest:
    """Read and validate a manifest; raise ``ManifestError`` naming file, line and field on the first problem."""
    source = os.fspath(url)
    if samples_per_class is not None and not 1 <= samples_per_class <= MAX_SAMPLES_PER_CLASS:
        raise ManifestError(f"samples_per_class: {samples_per_class} outside 1..{MAX_SAMPLES_PER_CLASS}")
    if PLACEHOLDER not in prompt_template:
        raise ManifestError(f"prompt_template: {prompt_template!r} must contain {PLACEHOLDER}")
    fmt = _format_of(source)
    raw = _read_bytes(source)
    records = _parse(fmt, raw, source, has_default_count=samples_per_class is not None)
    builder = _RowBuilder(source, samples_per_class, prompt_template)
    rows = tuple(builder.build(position, line, record) for position, (line, record) in enumerate(records, 1))
    if not rows:
        raise ManifestError(f"{source}: class_name: empty manifest, no class rows")
    return Manifest(source, rows, hashlib.sha256(raw).hexdigest(), samples_per_class)


def _format_of(source: str) -> str:
    name = source.rsplit("/", 1)[-1].lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise ManifestError(f"{source}: unknown manifest format; use one of {', '.join(FORMATS)}")


def _read_bytes(source: str) -> bytes:
    try:
        with fsspec.open(source, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ManifestError(f"{source}: manifest file not found") from e
    except OSError as e:  # a directory, no permission, an unreachable store ...
        raise ManifestError(f"{source}: cannot read manifest: {e}") from e


def _parse(fmt: str, raw: bytes, source: str, has_default_count: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, {column: value}) per class row, columns already checked against ``COLUMNS``."""
    if fmt == "parquet":
        return _parquet_records(raw, source, has_default_count)
    text = _decode(raw, source)
    if fmt == "txt":
        if not has_default_count:
            raise ManifestError(f"{source}: num_samples: a text manifest has no counts; pass samples_per_class")
        return _txt_records(text)
    if fmt == "jsonl":
        return _jsonl_records(text, source)
    return _delimited_records(text, source, has_default_count, "\t" if fmt == "tsv" else ",")


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate the byte-order mark spreadsheet programs write
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ManifestError(f"{source}:{line}: encoding: invalid UTF-8 (byte {e.start} of the file)") from e


def _check_columns(columns: list[str], where: str) -> None:
    """``where`` is ``"<file>:<line>"`` of the header or JSON line (``"<file>"`` for a Parquet schema)."""
    allowed = ", ".join(COLUMNS)
    seen: set[str] = set()
    for column in columns:
        if column not in COLUMNS:
            raise ManifestError(f"{where}: {column or '<empty>'}: unknown column; allowed: {allowed}")
        if column in seen:
            raise ManifestError(f"{where}: {column}: column appears twice")
        seen.add(column)


def _check_required(present: list[str], where: str, has_default_count: bool) -> None:
    """Table-level check for formats with a header or schema; JSON lines are checked value by value."""
    if "class_name" not in present:
        raise ManifestError(f"{where}: class_name: missing required column")
    if "num_samples" not in present and not has_default_count:
        raise ManifestError(f"{where}: num_samples: missing required column (or pass samples_per_class)")


def _txt_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.split("\n"), 1):
        content = content.removesuffix("\r")
        if content.strip() and not content.lstrip().startswith("#"):
            yield line, {"class_name": content}


def _jsonl_records(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}:{line}: json: malformed JSON line: {e.msg} at column {e.colno}") from e
        if not isinstance(record, dict):
            raise ManifestError(f"{source}:{line}: json: expected an object, got {type(record).__name__}")
        _check_columns(list(record), f"{source}:{line}")
        yield line, record


def _delimited_records(
    text: str, source: str, has_default_count: bool, delimiter: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    line = 0  # last physical line consumed; a record starts on the line after the previous one ended
    while True:
        start = line + 1
        try:
            fields = next(reader, None)
        except csv.Error as e:
            field = "header" if header is None else "columns"
            raise ManifestError(f"{source}:{start}: {field}: malformed {delimiter!r}-separated line: {e}") from e
        line = reader.line_num
        if fields is None:
            return
        if not fields or fields == [""]:
            continue  # blank line
        if header is None:
            header = [f.strip() for f in fields]
            _check_columns(header, f"{source}:{start}")
            _check_required(header, f"{source}:{start}", has_default_count)
            continue
        if len(fields) != len(header):
            raise ManifestError(f"{source}:{start}: columns: expected {len(header)} fields, got {len(fields)}")
        yield start, dict(zip(header, fields))


def _parquet_records(raw: bytes, source: str, has_default_count: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{source}: format: not a readable Parquet file: {e}") from e
    _check_columns(table.column_names, source)
    _check_required(table.column_names, source, has_default_count)
    for row, record in enumerate(table.to_pylist(), 1):
        yield row, record


class _RowBuilder:
    """Turns raw (line, record) pairs into validated ``ClassRow``s, remembering names and ids for duplicates."""

    def __init__(self, source: str, samples_per_class: int | None, prompt_template: str):
        self.source = source
        self.samples_per_class = samples_per_class
        self.prompt_template = prompt_template
        self.lines_by_name: dict[str, int] = {}
        self.lines_by_id: dict[int, int] = {}

    def build(self, position: int, line: int, record: dict[str, Any]) -> ClassRow:
        where = f"{self.source}:{line}"
        name = _text(record.get("class_name"), where, "class_name").strip()
        if not name:
            raise ManifestError(f"{where}: class_name: missing, empty or whitespace-only class name")
        self._claim(self.lines_by_name, name.casefold(), line, f"class_name: duplicate class name {name!r}")

        count = _integer(record.get("num_samples"), where, "num_samples", self.samples_per_class)
        if count is None:
            raise ManifestError(f"{where}: num_samples: missing value (give a count or pass samples_per_class)")
        if not 1 <= count <= MAX_SAMPLES_PER_CLASS:
            raise ManifestError(f"{where}: num_samples: {count} outside 1..{MAX_SAMPLES_PER_CLASS}")

        class_id = _integer(record.get("class_id"), where, "class_id", position)
        if not 1 <= class_id <= MAX_CLASS_ID:
            raise ManifestError(
                f"{where}: class_id: {class_id} outside 1..{MAX_CLASS_ID} (mask value 0 is background, 255 ignore; "
                f"at most {MAX_CLASS_ID} classes)"
            )
        self._claim(self.lines_by_id, class_id, line, f"class_id: duplicate class id {class_id}")

        prompt = _text(record.get("prompt"), where, "prompt").strip() or self.prompt_template
        if PLACEHOLDER in prompt:
            prompt = prompt.replace(PLACEHOLDER, name)
        elif name.casefold() not in prompt.casefold():
            raise ManifestError(f"{where}: prompt: {prompt!r} contains neither {PLACEHOLDER} nor the class name {name!r}")
        negative = _text(record.get("negative_prompt"), where, "negative_prompt").strip()
        return ClassRow(name, class_id, count, prompt, negative, line)

    def _claim(self, lines_by_key: dict[Any, int], key: Any, line: int, problem: str) -> None:
        first = lines_by_key.setdefault(key, line)
        if first != line:
            raise ManifestError(f"{self.source}:{line}: {problem} (first at {self.source}:{first})")


def _text(value: Any, where: str, field: str) -> str:
    """A text cell: ``""`` when absent; rejects non-text and control characters."""
    if value is None:
        return ""
    if isinstance(value, bytes):  # Parquet binary columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{where}: {field}: invalid UTF-8") from e
    if not isinstance(value, str):
        raise ManifestError(f"{where}: {field}: expected text, got {type(value).__name__} {value!r}")
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ManifestError(f"{where}: {field}: control character {bad!r} in {value!r}")
    return value


def _integer(value: Any, where: str, field: str, default: int | None) -> int | None:
    """An integer cell: ``default`` when absent (None, empty or whitespace text); rejects non-integers."""
    if isinstance(value, str):
        if not value.strip():
            return default
        if not _INTEGER.fullmatch(value.strip()):
            raise ManifestError(f"{where}: {field}: {value!r} is not an integer")
        return int(value.strip())
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # JSON 10.0, Parquet columns pandas stored as float
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ManifestError(f"{where}: {field}: {value!r} is not an integer")
