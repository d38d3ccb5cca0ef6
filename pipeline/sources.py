"""Inputs of ``seediff annotate``: which images there are, in a fixed order, and which classes each one is to be
labelled with. The annotate plan is the generate plan with *input units* in place of manifest rows: a unit is an
input WebDataset shard (its samples, in tar order) or one image file, and global sample ids run over the units in
order, and output shards are contiguous id ranges (``samples_per_shard`` re-shards; contiguous, unlike generate's
interleaved default, so that each input tar is read once across the output shards it feeds).

INPUT is one of: WebDataset tar URLs or a brace pattern (``.../shard-{000000..000099}.tar``), a wids
``dataset.json`` (or a folder holding one, or ``.tar`` files), a folder of images (searched recursively), or a text
file of image paths/URLs (one per line). Every URL is opened with fsspec.

A sample's classes: the ``--classes`` list for every image; or, per sample, the names listed in its json
(``--classes-field``), the integers of its own field (WebDataset's ``cls``) indexing the ``--classes`` table
(``--classes-field`` with ``--classes``), or the marked phrases of its caption, which is then its prompt
(``--caption-field``, the scene-prompt syntax of ``seediff.schemas.prompts``).

Sample counts of tar units come from ``dataset.json`` (``nsamples``) when there is one; otherwise the tars are read
once when the plan is made (also whenever classes come from the samples, so bad ones are refused before Ray)."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import fsspec

from seediff.pipeline.plan import SampleRanges, sample_seed
from seediff.schemas.config import InputError, RunConfig
from seediff.schemas.manifest import LabelledClass, class_key
from seediff.schemas.prompts import (
    CLASS_PLACEHOLDER, Phrase, PromptSyntaxError, Template, class_template, parse, substituted,
)
from seediff.schemas.records import DATASET_JSON, TAR_SUFFIX, InputSample, InputSpec, ShardSpec
from seediff.tokens import PhrasePositionError, context_check

# file suffix -> sample field (one of IMAGE_FIELDS): JPEG files are stored as webdataset's usual jpg
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
LIST_SUFFIX = ".txt"
TABLE_FILE = "@"  # --classes @FILE: the class list from a file, one name per line
MISSING = "__missing__"  # read_unit: the field of a listed file that is not there, holding why
TAR_META = re.compile(r"__[^/]*__($|/)")  # tar members webdataset skips (its tar_file_iterator's skip_meta)
INDEX_SEPARATORS = re.compile(r"[\s,]+")  # between the integers of a multi-label cls field


class AnnotateInputError(InputError):
    """An annotate input that cannot be read or labelled; the message names the file (and line or field)."""


@dataclass(frozen=True)
class InputUnit:
    """One input shard (``kind == "tar"``) or one image file (``kind == "file"``)."""

    url: str
    kind: str
    num_samples: int
    classes: tuple[str, ...] | None = None  # a file's own class names (eval's ground-truth classes), else None
    key: str | None = None  # a file's sample key, when the caller names it (eval: the image id)


@dataclass(frozen=True)
class ImageInput:
    source: str  # INPUT as given
    units: tuple[InputUnit, ...]
    class_names: tuple[str, ...] = field(default=())  # index + 1 = class id (0 is background)
    class_table: bool = False  # the samples' classes_field holds indexes into class_names (0 = the first)

    @property
    def num_samples(self) -> int:
        return sum(u.num_samples for u in self.units)

    def fingerprint(self) -> str:
        """sha256 of what fixes the sample ids and classes: unit URLs, counts, classes. Recorded in run.json; a
        resume over a changed input is refused."""
        data = [[u.url, u.kind, u.num_samples, u.classes, u.key] for u in self.units] + [list(self.class_names)]
        return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()

    def labelled(self, name: str, where: str) -> LabelledClass:
        """The run's class named ``name`` (under ``manifest.class_key``: case and Unicode form folded, as in
        manifests), with its id and the name as first written."""
        for index, known in enumerate(self.class_names):
            if class_key(known) == class_key(name):
                return LabelledClass(known, index + 1)
        raise AnnotateInputError(f"{where}: class {name!r} is not among the run's classes {list(self.class_names)}")


# ---- finding the units --------------------------------------------------------------------------------------------


def list_units(source: str) -> list[InputUnit]:
    """The input units of INPUT, in order (sample counts of tars not yet known: -1)."""
    if "{" in source or source.endswith(TAR_SUFFIX):
        return [InputUnit(url, "tar", -1) for url in braceexpand.braceexpand(source)]
    if source.endswith(".json"):
        return _indexed_tars(source)
    fs, path = fsspec.core.url_to_fs(source)
    if source.endswith(LIST_SUFFIX) and fs.isfile(path):
        return _listed_files(source, fs, path)
    if not fs.isdir(path):
        raise AnnotateInputError(f"{source}: not found (expected tar URLs, a dataset.json, a folder or a .txt list)")
    if fs.exists(f"{path}/{DATASET_JSON}"):
        return _indexed_tars(f"{source.rstrip('/')}/{DATASET_JSON}")
    everything = sorted(fs.find(path))
    tars = [p for p in everything if p.endswith(TAR_SUFFIX)]
    if tars:
        return [InputUnit(fs.unstrip_protocol(p), "tar", -1) for p in tars]
    images = [p for p in everything if posixpath.splitext(p)[1].lower() in IMAGE_SUFFIXES]
    if not images:
        raise AnnotateInputError(f"{source}: no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)})")
    return [InputUnit(fs.unstrip_protocol(p), "file", 1) for p in images]


def _indexed_tars(url: str) -> list[InputUnit]:
    try:
        with fsspec.open(url, "rb") as f:
            descriptor = json.load(f)
        shards = descriptor["shardlist"]
        base = url.rsplit("/", 1)[0]
        return [InputUnit(_join(base, s["url"]), "tar", int(s["nsamples"])) for s in shards]
    except FileNotFoundError:
        raise AnnotateInputError(f"{url}: not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise AnnotateInputError(f"{url}: not a wids descriptor with a shardlist of url/nsamples ({e})") from None


def _join(base: str, url: str) -> str:
    return url if "://" in url or url.startswith("/") else f"{base}/{url}"


def _listed_files(source: str, fs: Any, path: str) -> list[InputUnit]:
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    units = []
    for number, line in enumerate(fs.cat_file(path).decode("utf-8").splitlines(), start=1):
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        if posixpath.splitext(url.split("?", 1)[0])[1].lower() not in IMAGE_SUFFIXES:
            raise AnnotateInputError(f"{source}:{number}: {url!r} is not an image path ({', '.join(IMAGE_SUFFIXES)})")
        units.append(InputUnit(_join(base, url), "file", 1))
    if not units:
        raise AnnotateInputError(f"{source}: no image paths")
    return units


# ---- counting and classes -----------------------------------------------------------------------------------------


def class_list(value: str) -> list[str]:
    """``--classes`` as written: ``"dog,cat"``, or ``@FILE`` (local or any fsspec URL), a class list as ``eval``
    reads it (``layouts.read_class_list``: one name per line, blank lines and ``#`` lines skipped), since
    ImageNet-sized tables do not fit a comma list."""
    if value.startswith(TABLE_FILE):
        from seediff.pipeline.layouts import read_class_list  # eval's class list format; torch only when needed

        try:
            return list(read_class_list(value[len(TABLE_FILE):]))
        except FileNotFoundError:
            raise AnnotateInputError(f"--classes {value}: not found") from None
    from seediff.pipeline.layouts import split_escaped  # the class lists' one codec: "x\,y" is one name

    names = [name.strip() for name in split_escaped(value, ",") if name.strip()]
    if not names:
        raise AnnotateInputError(f'--classes {value!r}: no class names (e.g. --classes "dog,cat" or @classes.txt)')
    return names


def _readable(samples: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """The samples of an input tar; a damaged tar (truncated, not a tar) is refused in one line naming it."""
    count = 0
    try:
        for sample in samples:
            count += 1
            yield sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AnnotateInputError(f"{url}: unreadable tar after {count} samples ({type(e).__name__}: {e})") from None


def open_input(
    source: str | Sequence[InputUnit],
    classes: Sequence[str] | None,
    classes_field: str | None,
    caption_field: str | None = None,
    check_caption: Callable[[Template], None] | None = None,
) -> ImageInput:
    """Resolve INPUT (or ready-made units, as eval makes them) into units with sample counts and the run's class
    list: ``classes`` (one vocabulary for every image; with ``classes_field``, the table its integers index; with
    ``caption_field``, the first ids) followed by the names the samples' own fields give (``sample_labels``), in
    order of first appearance. Reads the tars when counts or per-sample classes require it, so a sample whose classes
    cannot be read is refused here, before Ray; so is a caption ``check_caption`` refuses (a labelled phrase past the
    text encoder's context)."""
    units = list_units(source) if isinstance(source, str) else list(source)
    name = source if isinstance(source, str) else "input"
    per_sample = classes_field or caption_field
    if classes_field and caption_field:
        raise AnnotateInputError("annotate: give --classes-field or --caption-field, not both")
    if classes is None and not per_sample and not all(u.classes for u in units):
        raise AnnotateInputError("annotate: give --classes, --classes-field or --caption-field")
    table = tuple(classes) if classes is not None and classes_field else None
    if table and len({class_key(n) for n in table}) < len(table):
        twice = next(n for n in table if [class_key(t) for t in table].count(class_key(n)) > 1)
        raise AnnotateInputError(f"--classes: {twice!r} listed twice; --classes-field indexes the table by position")
    found: dict[str, str] = {}  # class_key -> the name as first written

    def add(names: Sequence[str]) -> None:
        for n in names:
            found.setdefault(class_key(n), n)

    add(classes or ())
    for u in units:
        add(u.classes or ())
    from seediff.pipeline.readers import raw_samples  # webdataset and torch only once tars are read

    resolved = []
    for unit in units:
        if unit.kind == "tar" and (unit.num_samples < 0 or per_sample):
            count = 0
            for sample in _readable(raw_samples(unit.url), unit.url):
                count += 1
                if per_sample:
                    names, caption = sample_labels(sample, classes_field, caption_field, table)
                    if caption is not None and check_caption is not None:
                        try:
                            check_caption(caption)
                        except PhrasePositionError as e:
                            where = f"{sample_where(sample)}: {caption_field} (--caption-field)"
                            raise AnnotateInputError(f"{where}: {e}") from None
                    add(names)
            unit = InputUnit(unit.url, unit.kind, count)
        elif unit.kind == "file" and per_sample:
            flag = "--caption-field" if caption_field else "--classes-field"
            raise AnnotateInputError(f"{unit.url}: {flag} needs WebDataset input (an image file has no other fields)")
        resolved.append(unit)
    class_names = tuple(found.values())
    if not class_names:
        raise AnnotateInputError(f"{name}: no class names (--classes, --classes-field or --caption-field)")
    if len(class_names) > 254:
        raise AnnotateInputError(f"{name}: {len(class_names)} classes; label maps hold ids 1..254")
    return ImageInput(name, tuple(resolved), class_names, class_table=table is not None)


def annotate_input(source: str, config: RunConfig, classes: Sequence[str] | None) -> ImageInput:
    """The images of INPUT (``source``, an absolute local path or any fsspec URL) and the run's classes
    (``classes``, ``config.annotate.classes_field`` or ``caption_field``): ``open_input`` with every caption
    checked against the text encoder's context. Raises an ``InputError`` naming the file (and the sample and
    field)."""
    settings = config.annotate
    check_caption = context_check(config, exact=False) if settings.caption_field else None
    return open_input(source, classes, settings.classes_field, settings.caption_field, check_caption)


def sample_labels(
    sample: dict[str, Any], classes_field: str | None, caption_field: str | None, table: Sequence[str] | None
) -> tuple[list[str], Template | None]:
    """One sample's class names, from its own fields, and its caption when the caption is its prompt (None: the
    prompt template names the classes): the phrases marked in its ``caption_field``, the names its
    ``classes_field`` indexes in ``table``, or the names listed under ``classes_field`` in its json."""
    if caption_field:
        caption = caption_template(sample, caption_field)
        return [phrase.class_name for phrase in caption.phrases], caption
    if table is not None:
        return indexed_classes(sample, classes_field, table), None
    return listed_classes(sample, classes_field), None


def listed_classes(sample: dict[str, Any], classes_field: str) -> list[str]:
    """The class names listed under ``classes_field`` in a sample's ``json`` field."""
    names = json_value(sample, classes_field, "--classes-field")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise AnnotateInputError(
            f"{sample_where(sample)}: json[{classes_field!r}] must be a list of class names, got {names!r}"
        )
    return [n.strip() for n in names]


def indexed_classes(sample: dict[str, Any], classes_field: str, table: Sequence[str]) -> list[str]:
    """The names of ``table`` that a sample's ``classes_field`` indexes, 0 = the first (WebDataset's and ImageNet's
    convention): text of integers separated by spaces or commas (a ``cls`` field: b"3", b"3 7"), or a json integer
    or list of integers."""
    value = field_value(sample, classes_field, "--classes-field")
    where = f"{sample_where(sample)}: {classes_field} (--classes-field)"
    items = INDEX_SEPARATORS.split(value.strip()) if isinstance(value, str) else value
    items = items if isinstance(items, list) else [items]
    if not items or not all(type(i) is int or isinstance(i, str) and i.isascii() and i.isdigit() for i in items):
        raise AnnotateInputError(f"{where}: expected class indexes (integers, 0 = {table[0]!r}), got {value!r}")
    indexes = [int(i) for i in items]
    outside = [i for i in indexes if not 0 <= i < len(table)]
    if outside:
        raise AnnotateInputError(f"{where}: class index {outside[0]} is outside the --classes table of {len(table)} "
                                 f"names (0..{len(table) - 1})")
    return [table[i] for i in indexes]


def caption_template(sample: dict[str, Any], caption_field: str) -> Template:
    """A sample's caption in the scene-prompt syntax (``a {dog} on a {sofa:couch}``), parsed: rendered, it is the
    sample's prompt, and its marked phrases place its classes, exactly as a scene prompt of ``generate``."""
    caption = field_value(sample, caption_field, "--caption-field")
    where = f"{sample_where(sample)}: {caption_field} (--caption-field)"
    if not isinstance(caption, str):
        raise AnnotateInputError(f"{where}: expected a caption, got {caption!r}")
    try:
        template = parse(caption.strip())
    except PromptSyntaxError as e:
        raise AnnotateInputError(f"{where}: {e}") from None
    if not template.always_labels:
        raise AnnotateInputError(f"{where}: caption {caption.strip()!r} marks no class; mark each as {{dog}} or "
                                 "{phrase:dog}")
    return template


def field_value(sample: dict[str, Any], key: str, flag: str) -> Any:
    """A sample's own field ``key`` (``cls``, ``txt``: its bytes as UTF-8 text) or, when it has none, ``key`` of its
    ``json``."""
    if key not in sample:
        return json_value(sample, key, flag)
    try:
        return sample[key].decode("utf-8")
    except UnicodeDecodeError:
        raise AnnotateInputError(f"{sample_where(sample)}: {key} ({flag}): not UTF-8 text") from None


def json_value(sample: dict[str, Any], key: str, flag: str) -> Any:
    """``key`` of a sample's ``json`` field."""
    where = sample_where(sample)
    if "json" not in sample:
        raise AnnotateInputError(f"{where}: no field {key!r} and no json field to read {flag} {key!r} from")
    try:
        return json.loads(sample["json"])[key]
    except (ValueError, KeyError, TypeError):
        raise AnnotateInputError(f"{where}: json has no key {key!r} ({flag})") from None


def sample_where(sample: dict[str, Any]) -> str:
    """``url: sample key``, the start of every message about one input sample."""
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


# ---- reading samples on the actor -------------------------------------------------------------------------------


def read_unit(unit: InputUnit, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples ``[start, stop)`` of a unit as raw fields (name -> bytes, plus ``__key__``), exactly as stored.
    A file unit becomes one sample whose image field is named by its suffix."""
    if unit.kind == "file":
        if start == 0 and stop >= 1:
            suffix = posixpath.splitext(unit.url.split("?", 1)[0])[1].lower()
            try:
                with fsspec.open(unit.url, "rb") as f:
                    yield {"__key__": unit.key, "__url__": unit.url, IMAGE_SUFFIXES[suffix]: f.read()}
            except FileNotFoundError:  # this sample's own failure; a network error still fails the shard
                yield {"__key__": unit.key, "__url__": unit.url, MISSING: f"{unit.url}: not found"}
        return
    with fsspec.open(unit.url, "rb") as f:
        if f.seekable():
            yield from _seek_samples(f, unit.url, start, stop)
            return
    from seediff.pipeline.readers import raw_samples  # a stream that cannot seek: read from the start

    for index, sample in enumerate(raw_samples(unit.url)):
        if index >= stop:
            return
        if index >= start:
            yield sample


def _seek_samples(f: Any, url: str, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples ``[start, stop)`` of a seekable tar, grouped as webdataset groups them (``base_plus_ext`` keys,
    lower-case suffixes, regular files, ``__meta__`` names skipped): only the members' headers are read before
    ``start`` (tarfile seeks over their data), and reading stops at ``stop``, so the output shards of one input tar
    read its data once between them."""
    from webdataset.tariterators import base_plus_ext

    index, key, sample = -1, None, None
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isreg() or TAR_META.match(member.name):
                continue
            prefix, suffix = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key:
                if sample is not None:
                    yield sample
                index, key, sample = index + 1, prefix, None
                if index >= stop:
                    return
                if index >= start:
                    sample = {"__key__": prefix, "__url__": url}
            if sample is not None:
                sample[suffix.lower()] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


# ---- the annotate plan --------------------------------------------------------------------------------------------


class AnnotatePlan(SampleRanges):
    """The annotate plan: the generate plan's shard arithmetic over input units instead of manifest rows (sample
    ids run over the units in order, shards are contiguous id ranges, the same seeds). A sample's classes and prompt
    come from reading the input: ``samples(shard)`` runs on the actor, like the generate plan's."""

    kind = "annotate"  # the actor's choice of how a batch gets its images (workers/actor.py)

    def __init__(self, image_input: ImageInput, config: RunConfig):
        super().__init__([u.num_samples for u in image_input.units], config.samples_per_shard)
        self.global_seed = config.seed
        self.input = image_input
        self.template = class_template(config.prompt_template)
        self.classes_field = config.annotate.classes_field
        self.caption_field = config.annotate.caption_field

    def example_ids(self) -> list[int]:
        """None: a sample's classes and prompt are known only once its image is read."""
        return []

    def samples(self, shard: ShardSpec) -> tuple[InputSample, ...]:
        """The shard's input samples, read from the units its id range covers, each with its spec."""
        read: list[InputSample] = []
        sample_id = shard.start
        while sample_id < shard.stop:
            unit_index, index = self.locate(sample_id)
            unit = self.input.units[unit_index]
            stop = min(unit.num_samples, index + shard.stop - sample_id)
            for fields in read_unit(unit, index, stop):
                template, classes = self.labelling(unit, fields)
                spec = InputSpec(sample_id, sample_seed(self.global_seed, sample_id), unit_index, index,
                                 template, classes, unit.url, fields.get("__key__"))
                read.append(InputSample(spec, fields, fields.pop(MISSING, None)))
                sample_id, index = sample_id + 1, index + 1
            if index < stop:
                raise AnnotateInputError(f"{unit.url}: {index} samples, the plan counted {unit.num_samples}; the input "
                                         "changed since the run was planned")
        return tuple(read)

    def labelling(self, unit: InputUnit, fields: dict[str, Any]) -> tuple[Template, tuple[LabelledClass, ...]]:
        """The sample's prompt template and classes: its caption (``--caption-field``), or the prompt template with
        its class phrase replaced by the class names ("a photograph of a dog and cat")."""
        where = f"{unit.url}: sample {fields.get('__key__')}"
        caption = None
        if unit.classes is not None:
            names = list(unit.classes)
        elif self.classes_field or self.caption_field:
            table = self.input.class_names if self.input.class_table else None
            names, caption = sample_labels(fields, self.classes_field, self.caption_field, table)
        else:
            names = list(self.input.class_names)
        labelled = {c.name: c for c in (self.input.labelled(n, where) for n in names)}  # folded: one per class
        classes = tuple(labelled.values())
        if caption is not None:  # its phrases name the classes as the run first wrote them
            caption = substituted(caption, lambda p: (Phrase(p.text, self.input.labelled(p.class_name, where).name),))
        return caption or listing(self.template, classes), classes


def listing(template: Template, classes: Sequence[LabelledClass]) -> Template:
    """A shared class template (``prompt_template``) labelling several classes: its class phrase becomes the class
    names, "dog, cat and bird" (one class keeps a phrase of its own, ``{puppy:class_name}``); a phrase of another
    class is plain text."""

    def names(phrase: Phrase) -> tuple[Any, ...]:
        if phrase.class_name != CLASS_PLACEHOLDER:
            return (phrase.text,)
        if len(classes) == 1 and phrase.text != CLASS_PLACEHOLDER:
            return (Phrase(phrase.text, classes[0].name),)
        parts: list[Any] = []
        for k, labelled in enumerate(classes):
            if k:
                parts.append(" and " if k == len(classes) - 1 else ", ")
            parts.append(Phrase(labelled.name, labelled.name))
        return tuple(parts)

    return substituted(template, names)
