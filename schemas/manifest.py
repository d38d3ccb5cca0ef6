"""Manifest: what to generate, read from a table (CSV, TSV, JSONL, Parquet) or a text file, validated before any
model is loaded. Errors name the file, the line (or row) and the field.

Reading rules (``load_manifest``):

* The source is opened with fsspec, so local paths and any fsspec URL (``s3://``, ``gs://``, ``memory://`` ...)
  work. The format comes from the file name: ``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``,
  ``.txt``. ``Manifest.sha256`` is the sha256 of the source bytes (and of the classes and prompts files, if any).
* Parquet is read with pyarrow; "line" in messages is the 1-based row number. CSV, TSV and JSONL are parsed with
  the standard ``csv``/``json`` modules, because pyarrow's text readers skip blank lines and report no source
  line for most errors; this way "line" is the exact 1-based physical line, header counted.
* Two kinds of table. A **class table** has a ``class_name`` column: one class per sample. Columns ``class_name``,
  ``num_samples`` (required unless ``samples_per_class`` is given), ``prompt``, ``class_id``, ``negative_prompt``.
  A **scene table** has a ``prompt`` column and no ``class_name`` column: each prompt labels one or more classes
  with the syntax of ``seediff.schemas.prompts`` (``a {dog} chasing a {cat} under a [table|chair]``); columns
  ``prompt``, ``num_samples``, ``negative_prompt``. A JSONL file is a scene table when its first record has no
  ``class_name``.
* Text files hold one class name per line (a class table); blank lines and lines whose first non-blank character is
  ``#`` are skipped (a class name cannot start with ``#``); ``samples_per_class`` is required.
* A value that is absent (no column, missing JSON key, empty cell, null) takes its default: ``samples_per_class`` for
  ``num_samples`` (so explicit counts always win over the flag), ``""`` for ``negative_prompt``.
* Class ids: a class table's ``class_id`` column, else the classes file (``classes``: a class table with
  ``class_name`` and ``class_id``), else the row's 1-based position (class table) or the order of first use across
  the manifest (scene table). Mask values are 8-bit: ids 1..254 (0 background, 255 ignore).
* Class-table prompts use the same mechanism as scenes: the row's ``prompt``, else a template drawn per sample from
  the prompts file (``prompts``: one template per line), else ``prompt_template``. In a template ``{class_name}`` (or
  ``{phrase:class_name}``) marks the labelled phrase; a literal prompt without a marked phrase is labelled at the one
  whole-word, case-insensitive occurrence of the class name and refused when it is absent or ambiguous.
* Class names are stripped of surrounding whitespace and compared by ``casefold`` of their NFC form: names that
  differ only in case are one class; names that differ only by Unicode normalisation are refused. Up to
  ``MAX_CLASSES_PER_PROMPT`` classes per prompt.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from seediff.schemas.config import DEFAULT_PROMPT_TEMPLATE, InputError
from seediff.schemas.prompts import (
    CLASS_PLACEHOLDER, Choice, Phrase, PromptSyntaxError, RenderedPrompt, Template, class_template, draw, label_literal,
    parse,
)

MAX_SAMPLES_PER_CLASS = 10**9
MAX_CLASS_ID = 254  # mask values are 8-bit: 0 = background, 255 = ignore
MAX_CLASSES_PER_PROMPT = 8
COLUMNS = ("class_name", "num_samples", "prompt", "class_id", "negative_prompt")
SCENE_COLUMNS = ("prompt", "num_samples", "negative_prompt")
CLASSES_COLUMNS = ("class_name", "class_id")
PLACEHOLDER_CLASS = CLASS_PLACEHOLDER  # {class_name} in a class-table template marks the row's class
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
           ".pq": "parquet", ".txt": "txt"}
_INTEGER = re.compile(r"[+-]?[0-9]+")


class ManifestError(InputError):
    """Bad manifest input. The message starts with ``<file>:<line>: <field>:`` where a line applies."""


@dataclass(frozen=True)
class LabelledClass:
    name: str  # as first written (or as in the classes file)
    class_id: int  # 1..254 (0 = background, 255 = ignore in masks)


@dataclass(frozen=True)
class ManifestRow:
    """One row of a class table or a scene table: ``num_samples`` samples, each with a prompt rendered from one of
    ``prompts`` (drawn by the sample seed) whose labelled phrases name classes of ``classes``."""

    classes: tuple[LabelledClass, ...]  # every class the row's prompts can label, in order of first use
    num_samples: int
    prompts: tuple[Template, ...]  # phrases carry the canonical class names of ``classes``
    negative_prompt: str  # "" when none
    line: int  # 1-based line (text/CSV/TSV/JSONL) or row number (Parquet) in the source, for messages

    def render(self, seed: int) -> tuple[RenderedPrompt, tuple[LabelledClass, ...]]:
        """The sample's prompt and the classes it labels (in order of appearance): a pure function of the seed."""
        template = self.prompts[draw(seed, "template", len(self.prompts)) if len(self.prompts) > 1 else 0]
        prompt = template.render(seed)
        by_name = {c.name: c for c in self.classes}
        return prompt, tuple(by_name[name] for name in prompt.class_names)


@dataclass(frozen=True)
class Manifest:
    source: str  # path or URL as given
    rows: tuple[ManifestRow, ...]
    sha256: str  # of the source bytes (and classes/prompts files), recorded in dataset metadata
    samples_per_class: int | None = None  # the count given for rows without num_samples, recorded for resume
    classes_source: str | None = None  # the classes file as given, recorded for resume
    prompts_source: str | None = None  # the prompts file as given, recorded for resume

    @property
    def num_samples(self) -> int:
        return sum(r.num_samples for r in self.rows)

    @property
    def classes(self) -> tuple[LabelledClass, ...]:
        """Every class the manifest labels, in order of first use."""
        return tuple(dict.fromkeys(c for r in self.rows for c in r.classes))


def class_row(
    class_name: str, class_id: int, num_samples: int, prompt: str, negative_prompt: str = "", line: int = 1
) -> ManifestRow:
    """A class-table row labelling ``class_name`` in ``prompt`` (a template with ``{class_name}``, or a literal
    prompt holding the class name once as a whole word). ``PromptSyntaxError`` when it cannot."""
    template = _class_template(parse(prompt), class_name)
    return ManifestRow((LabelledClass(class_name, class_id),), num_samples, (template,), negative_prompt, line)


def _class_template(template: Template, class_name: str) -> Template:
    """``template`` with its phrases labelling ``class_name``: ``{class_name}`` renders the name itself."""
    if not template.phrases:
        return label_literal(template, class_name)
    key = class_key(class_name)

    def relabel(phrase: Phrase) -> Phrase:
        if phrase.class_name == PLACEHOLDER_CLASS:
            return Phrase(class_name if phrase.text == PLACEHOLDER_CLASS else phrase.text, class_name)
        if class_key(phrase.class_name) != key:
            raise PromptSyntaxError(
                f"labels class {phrase.class_name!r}, but a class-table row labels only its own class {class_name!r} "
                f"(use {{{PLACEHOLDER_CLASS}}}, or a scene table for several classes)"
            )
        return Phrase(phrase.text, class_name)

    return _relabelled(template, relabel)


def _relabelled(template: Template, relabel: Callable[[Phrase], Phrase]) -> Template:
    def part(p):
        if isinstance(p, Phrase):
            return relabel(p)
        if isinstance(p, Choice):
            return Choice(tuple(tuple(part(q) for q in alternative) for alternative in p.alternatives))
        return p

    return Template(template.source, tuple(part(p) for p in template.parts))


def class_key(name: str) -> str:
    """Names equal under this key are one class: NFC form, case-folded."""
    return unicodedata.normalize("NFC", name).casefold()


def load_manifest(
    url: str | os.PathLike[str],
    *,
    samples_per_class: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    classes: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    check_prompt: Callable[[Template], None] | None = None,
) -> Manifest:
    """Read and validate a manifest; raise ``ManifestError`` naming file, line and field on the first problem.
    ``classes``: a class table fixing the class ids; ``prompts``: a text file of templates drawn per sample by the
    class-table rows without a prompt of their own; ``check_prompt``: called once per distinct labelled template
    (the dry run's token-position bound, ``seediff.tokens``), its ValueError reported at the template's line."""
    source = os.fspath(url)
    if samples_per_class is not None and not 1 <= samples_per_class <= MAX_SAMPLES_PER_CLASS:
        raise ManifestError(f"samples_per_class: {samples_per_class} outside 1..{MAX_SAMPLES_PER_CLASS}")
    digest = hashlib.sha256()
    registry = _ClassRegistry(_read_classes(os.fspath(classes), digest) if classes is not None else None)
    if prompts is not None:
        templates = _read_prompts(os.fspath(prompts), digest)
    else:
        templates = (_shared_template(prompt_template, "prompt_template"),)
    fmt = _format_of(source)
    raw = _read_bytes(source)
    records = _parse(fmt, raw, source, samples_per_class is not None, COLUMNS + SCENE_COLUMNS)
    builder = _RowBuilder(source, samples_per_class, templates, registry, check_prompt)
    rows = tuple(builder.build(position, line, record) for position, (line, record) in enumerate(records, 1))
    if not rows:
        raise ManifestError(f"{source}: class_name: empty manifest, no rows")
    if prompts is not None and builder.scene:
        raise ManifestError(f"{os.fspath(prompts)}: prompts: a scene table's rows are its prompts; "
                            "a prompts file applies to class tables")
    return Manifest(source, rows, _sha256(raw, digest), samples_per_class, *(
        None if f is None else os.fspath(f) for f in (classes, prompts)
    ))


def _sha256(raw: bytes, extra: "hashlib._Hash") -> str:
    """The manifest's own bytes alone when no classes/prompts file was read (the digest of earlier runs)."""
    if extra.digest() == hashlib.sha256().digest():
        return hashlib.sha256(raw).hexdigest()
    extra.update(raw)
    return extra.hexdigest()


def _read_classes(source: str, digest: "hashlib._Hash") -> dict[str, tuple[LabelledClass, int]]:
    """The classes file: class key -> (class, line)."""
    raw = _read_bytes(source)
    digest.update(raw)
    fmt = _format_of(source)
    if fmt == "txt":
        records = _txt_records(_decode(raw, source))
    else:
        records = _parse(fmt, raw, source, True, CLASSES_COLUMNS)
    found: dict[str, tuple[LabelledClass, int]] = {}
    lines_by_id: dict[int, int] = {}
    for position, (line, record) in enumerate(records, 1):
        where = f"{source}:{line}"
        name = _class_name(record, where)
        class_id = _class_id(_integer(record.get("class_id"), where, "class_id", position), where)
        previous = found.get(class_key(name))
        if previous is not None:
            raise ManifestError(f"{where}: class_name: duplicate class name {name!r} "
                                f"(first at {source}:{previous[1]})")
        first = lines_by_id.setdefault(class_id, line)
        if first != line:
            raise ManifestError(f"{where}: class_id: duplicate class id {class_id} (first at {source}:{first})")
        found[class_key(name)] = (LabelledClass(name, class_id), line)
    if not found:
        raise ManifestError(f"{source}: class_name: empty classes file")
    return found


def _read_prompts(source: str, digest: "hashlib._Hash") -> tuple[tuple[Template, str], ...]:
    """The prompts file: one template per line (blank lines and ``#`` comments skipped) -> (template, origin)."""
    raw = _read_bytes(source)
    digest.update(raw)
    templates = []
    for line, record in _txt_records(_decode(raw, source)):
        templates.append(_shared_template(record["class_name"].strip(), f"{source}:{line}: prompt"))
    if not templates:
        raise ManifestError(f"{source}: prompt: empty prompts file")
    return tuple(templates)


def _shared_template(text: str, origin: str) -> tuple[Template, str]:
    """A template every class row without a prompt may draw: it must mark the row's class as ``{class_name}``."""
    try:
        return class_template(text), origin
    except PromptSyntaxError as e:
        raise ManifestError(f"{origin}: {e}") from e


def _class_id(class_id: int, where: str) -> int:
    if not 1 <= class_id <= MAX_CLASS_ID:
        raise ManifestError(
            f"{where}: class_id: {class_id} outside 1..{MAX_CLASS_ID} (mask value 0 is background, 255 ignore; "
            f"at most {MAX_CLASS_ID} classes)"
        )
    return class_id


class _ClassRegistry:
    """Class names -> ids across the manifest: fixed by a classes file, or assigned in order of first use."""

    def __init__(self, fixed: dict[str, tuple[LabelledClass, int]] | None):
        self.fixed = fixed
        self.by_key: dict[str, tuple[LabelledClass, str]] = {}  # key -> (class, where first used)
        self.ids: dict[int, str] = {}

    def resolve(self, name: str, where: str, field: str, class_id: int | None = None) -> LabelledClass:
        """The class of ``name`` used at ``where`` (``class_id``: a class table's id for it, if any)."""
        key = class_key(name)
        known = self.by_key.get(key)
        if known is not None:
            _check_same_spelling(name, known[0].name, where, field, known[1])
            if class_id is not None and class_id != known[0].class_id:
                raise ManifestError(f"{where}: class_id: class {name!r} has id {known[0].class_id} at {known[1]}")
            return known[0]
        if self.fixed is not None:
            if key not in self.fixed:
                raise ManifestError(f"{where}: {field}: unknown class {name!r}: not in the classes file")
            labelled, _ = self.fixed[key]
            _check_same_spelling(name, labelled.name, where, field, "the classes file")
            if class_id is not None and class_id != labelled.class_id:
                raise ManifestError(f"{where}: class_id: {class_id}, but the classes file gives {name!r} "
                                    f"id {labelled.class_id}")
        else:
            labelled = LabelledClass(name, _class_id(len(self.by_key) + 1 if class_id is None else class_id, where))
        first = self.ids.setdefault(labelled.class_id, where)
        if first != where:
            raise ManifestError(f"{where}: class_id: duplicate class id {labelled.class_id} (first at {first})")
        self.by_key[key] = (labelled, where)
        return labelled


def _check_same_spelling(name: str, known: str, where: str, field: str, known_where: str) -> None:
    """Names with the same key differ in case only (one class) or also in Unicode normalisation (refused)."""
    if name.casefold() != known.casefold():
        raise ManifestError(
            f"{where}: {field}: class name {name!r} differs from {known!r} ({known_where}) only by Unicode "
            f"normalisation (NFC forms are equal); write both the same way"
        )


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


def _parse(
    fmt: str, raw: bytes, source: str, has_default_count: bool, columns: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, {column: value}) per row, columns already checked against ``columns``."""
    if fmt == "parquet":
        return _parquet_records(raw, source, has_default_count, columns)
    text = _decode(raw, source)
    if fmt == "txt":
        if not has_default_count:
            raise ManifestError(f"{source}: num_samples: a text manifest has no counts; pass samples_per_class")
        return _txt_records(text)
    if fmt == "jsonl":
        return _jsonl_records(text, source, columns)
    return _delimited_records(text, source, has_default_count, "\t" if fmt == "tsv" else ",", columns)


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate the byte-order mark spreadsheet programs write
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ManifestError(f"{source}:{line}: encoding: invalid UTF-8 (byte {e.start} of the file)") from e


def _check_columns(columns: list[str], where: str, known: tuple[str, ...]) -> None:
    """``where`` is ``"<file>:<line>"`` of the header or JSON line (``"<file>"`` for a Parquet schema)."""
    allowed = ", ".join(dict.fromkeys(known))
    seen: set[str] = set()
    for column in columns:
        if column not in known:
            raise ManifestError(f"{where}: {column or '<empty>'}: unknown column; allowed: {allowed}")
        if column in seen:
            raise ManifestError(f"{where}: {column}: column appears twice")
        seen.add(column)


def _check_required(present: list[str], where: str, has_default_count: bool, known: tuple[str, ...]) -> None:
    """Table-level check for formats with a header or schema; JSON lines are checked value by value."""
    if "class_name" not in present and ("prompt" not in present or known == CLASSES_COLUMNS):
        scene = "" if known == CLASSES_COLUMNS else " (or a prompt column, for a scene table)"
        raise ManifestError(f"{where}: class_name: missing required column{scene}")
    if "num_samples" in known and "num_samples" not in present and not has_default_count:
        raise ManifestError(f"{where}: num_samples: missing required column (or pass samples_per_class)")


def _txt_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.split("\n"), 1):
        content = content.removesuffix("\r")
        if content.strip() and not content.lstrip().startswith("#"):
            yield line, {"class_name": content}


def _jsonl_records(text: str, source: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{source}:{line}: json: malformed JSON line: {e.msg} at column {e.colno}") from e
        if not isinstance(record, dict):
            raise ManifestError(f"{source}:{line}: json: expected an object, got {type(record).__name__}")
        _check_columns(list(record), f"{source}:{line}", columns)
        yield line, record


def _delimited_records(
    text: str, source: str, has_default_count: bool, delimiter: str, columns: tuple[str, ...]
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
            _check_columns(header, f"{source}:{start}", columns)
            _check_required(header, f"{source}:{start}", has_default_count, columns)
            continue
        if len(fields) != len(header):
            raise ManifestError(f"{source}:{start}: columns: expected {len(header)} fields, got {len(fields)}")
        yield start, dict(zip(header, fields))


def _parquet_records(
    raw: bytes, source: str, has_default_count: bool, columns: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        # on this thread: an Arrow pool task releasing a Python buffer at interpreter exit aborts the process
        table = pq.read_table(pa.BufferReader(raw), use_threads=False, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{source}: format: not a readable Parquet file: {e}") from e
    _check_columns(table.column_names, source, columns)
    _check_required(table.column_names, source, has_default_count, columns)
    for row, record in enumerate(table.to_pylist(), 1):
        yield row, record


class _RowBuilder:
    """Turns raw (line, record) pairs into validated ``ManifestRow``s; the first record decides the table's kind."""

    def __init__(
        self,
        source: str,
        samples_per_class: int | None,
        templates: tuple[tuple[Template, str], ...],
        registry: _ClassRegistry,
        check_prompt: Callable[[Template], None] | None,
    ):
        self.source = source
        self.samples_per_class = samples_per_class
        self.templates = templates  # (template, origin) for class rows without a prompt of their own
        self.registry = registry
        self.check_prompt = check_prompt
        self.checked: set[str] = set()  # rendered-template keys already checked
        self.scene: bool | None = None

    def build(self, position: int, line: int, record: dict[str, Any]) -> ManifestRow:
        where = f"{self.source}:{line}"
        scene = "class_name" not in record
        if self.scene is None:
            self.scene = scene
        elif scene != self.scene:
            kind = "scene table (no class_name)" if self.scene else "class table (with class_name)"
            raise ManifestError(f"{where}: class_name: this row does not fit the {kind} that the first row started")
        count = _integer(record.get("num_samples"), where, "num_samples", self.samples_per_class)
        if count is None:
            raise ManifestError(f"{where}: num_samples: missing value (give a count or pass samples_per_class)")
        if not 1 <= count <= MAX_SAMPLES_PER_CLASS:
            raise ManifestError(f"{where}: num_samples: {count} outside 1..{MAX_SAMPLES_PER_CLASS}")
        negative = _text(record.get("negative_prompt"), where, "negative_prompt").strip()
        if scene:
            return self._scene_row(line, record, count, negative)
        return self._class_row(position, line, record, count, negative)

    def _class_row(self, position: int, line: int, record: dict[str, Any], count: int, negative: str) -> ManifestRow:
        where = f"{self.source}:{line}"
        name = _class_name(record, where)
        if class_key(name) in self.registry.by_key:
            first = self.registry.by_key[class_key(name)][1]
            raise ManifestError(f"{where}: class_name: duplicate class name {name!r} (first at {first})")
        class_id = _integer(record.get("class_id"), where, "class_id", None)
        if class_id is None and self.registry.fixed is None:
            class_id = position
        labelled = self.registry.resolve(name, where, "class_name", class_id)
        prompt = _text(record.get("prompt"), where, "prompt").strip()
        if prompt:
            try:
                templates = [self._checked(_class_template(parse(prompt), labelled.name), f"{where}: prompt")]
            except PromptSyntaxError as e:
                raise ManifestError(f"{where}: prompt: {e}") from e
        else:
            templates = []
            for template, origin in self.templates:
                try:
                    templates.append(self._checked(_class_template(template, labelled.name), origin))
                except PromptSyntaxError as e:
                    raise ManifestError(f"{origin}: {e} (for {where}: class {labelled.name!r})") from e
        return ManifestRow((labelled,), count, tuple(templates), negative, line)

    def _scene_row(self, line: int, record: dict[str, Any], count: int, negative: str) -> ManifestRow:
        where = f"{self.source}:{line}"
        if record.get("class_id") not in (None, ""):
            raise ManifestError(f"{where}: class_id: a scene table takes class ids from the classes file or from "
                                "the order of first use")
        prompt = _text(record.get("prompt"), where, "prompt").strip()
        if not prompt:
            raise ManifestError(f"{where}: prompt: missing or empty prompt")
        try:
            template = parse(prompt)
        except PromptSyntaxError as e:
            raise ManifestError(f"{where}: prompt: {e}") from e
        if not template.phrases:
            raise ManifestError(f"{where}: prompt: {prompt!r} labels no class; mark phrases as {{dog}} or "
                                "{puppy:dog}")
        names = list(dict.fromkeys(p.class_name for p in template.phrases))
        distinct = list({class_key(n): n for n in reversed(names)}.values())
        if len(distinct) > MAX_CLASSES_PER_PROMPT:
            raise ManifestError(f"{where}: prompt: {len(distinct)} classes, at most {MAX_CLASSES_PER_PROMPT} "
                                "per prompt")
        resolved = {name: self.registry.resolve(name, where, "prompt") for name in names}
        template = self._checked(_relabelled(template, lambda p: Phrase(p.text, resolved[p.class_name].name)),
                                 f"{where}: prompt")
        classes = tuple(dict.fromkeys(resolved.values()))
        return ManifestRow(classes, count, (template,), negative, line)

    def _checked(self, template: Template, origin: str) -> Template:
        """Every rendering labels a class; ``check_prompt`` once per distinct labelled template. Problems are
        reported as ``origin: message``."""
        if not template.always_labels:
            raise ManifestError(f"{origin}: {template.source!r}: some choices of alternatives label no class; "
                                "put a labelled phrase outside [...] or in every alternative")
        key = repr(template.parts)
        if self.check_prompt is not None and key not in self.checked:
            try:
                self.check_prompt(template)
            except ValueError as e:
                raise ManifestError(f"{origin}: {e}") from e
            self.checked.add(key)
        return template


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


def _class_name(record: dict[str, Any], where: str) -> str:
    """A class table's ``class_name`` cell: text, not blank, and without characters that render invisibly, so two
    names that look alike are alike (``\u200b``, ``ca\u200dt`` are refused). A zero-width joiner between two
    symbols (an emoji sequence such as a family or a profession) is kept: it changes what is shown."""
    name = _text(record.get("class_name"), where, "class_name").strip()
    if not name:
        raise ManifestError(f"{where}: class_name: missing, empty or whitespace-only class name")
    for i, char in enumerate(name):
        if unicodedata.category(char) == "Cf" and not (char == ZERO_WIDTH_JOINER and _between_symbols(name, i)):
            raise ManifestError(f"{where}: class_name: zero-width or format character U+{ord(char):04X} in "
                                f"{name!r}")
    return name


ZERO_WIDTH_JOINER = "\u200d"


def _between_symbols(text: str, i: int) -> bool:
    def symbol(c: str) -> bool:
        return unicodedata.category(c) in ("So", "Sk", "Mn")  # pictographs, modifiers, variation selectors

    return 0 < i < len(text) - 1 and symbol(text[i - 1]) and symbol(text[i + 1])


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
