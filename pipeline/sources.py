"""Inputs of ``seediff annotate``: which images there are, in a fixed order, and which classes each one is to be
labelled with. The annotate plan is the generate plan with *input units* in place of manifest rows: a unit is an
input WebDataset shard (its samples, in tar order) or one image file, and global sample ids run over the units in
order, so output shards are the same contiguous id ranges as in ``generate`` (``samples_per_shard`` re-shards).

INPUT is one of: WebDataset tar URLs or a brace pattern (``.../shard-{000000..000099}.tar``), a wids
``dataset.json`` (or a folder holding one, or ``.tar`` files), a folder of images (searched recursively), or a text
file of image paths/URLs (one per line). Every URL is opened with fsspec.

Sample counts of tar units come from ``dataset.json`` (``nsamples``) when there is one; otherwise the tars are read
once when the plan is made (also needed when class names come from each sample's ``json``)."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import fsspec

from seediff.pipeline.plan import Plan, sample_seed
from seediff.schemas.config import InputError, RunConfig
from seediff.schemas.manifest import LabelledClass, ManifestRow
from seediff.schemas.prompts import Phrase, Template
from seediff.schemas.records import DATASET_JSON, TAR_SUFFIX, InputSample, SampleSpec, ShardSpec

PLACEHOLDER = "{class_name}"

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # file suffix -> sample field
LIST_SUFFIX = ".txt"


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

    @property
    def num_samples(self) -> int:
        return sum(u.num_samples for u in self.units)

    def fingerprint(self) -> str:
        """sha256 of what fixes the sample ids and classes: unit URLs, counts, classes. Recorded in run.json; a
        resume over a changed input is refused."""
        data = [[u.url, u.kind, u.num_samples, u.classes, u.key] for u in self.units] + [list(self.class_names)]
        return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()

    def class_id(self, name: str, where: str) -> int:
        try:
            return self.class_names.index(name) + 1
        except ValueError:
            raise AnnotateInputError(f"{where}: class {name!r} is not among the run's classes {list(self.class_names)}") from None


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


def open_input(source: str | Sequence[InputUnit], classes: Sequence[str] | None, classes_field: str | None) -> ImageInput:
    """Resolve INPUT (or ready-made units, as eval makes them) into units with sample counts and the run's class
    list: ``classes`` (one vocabulary for every image) or the names found under ``classes_field`` in the samples'
    ``json``, in order of first appearance. Reads the tars only when counts or class names require it."""
    units = list_units(source) if isinstance(source, str) else list(source)
    name = source if isinstance(source, str) else "input"
    if (classes is None) == (classes_field is None) and not all(u.classes for u in units):
        raise AnnotateInputError("annotate: give exactly one of --classes and --classes-field")
    found: dict[str, None] = dict.fromkeys(classes or ())
    for u in units:
        found.update(dict.fromkeys(u.classes or ()))
    from seediff.pipeline.readers import raw_samples  # webdataset and torch only once tars are read

    resolved = []
    for unit in units:
        if unit.kind == "tar" and (unit.num_samples < 0 or classes_field):
            count = 0
            for sample in raw_samples(unit.url):
                count += 1
                if classes_field:
                    found.update(dict.fromkeys(listed_classes(sample, classes_field)))
            unit = InputUnit(unit.url, unit.kind, count)
        elif unit.kind == "file" and classes_field:
            raise AnnotateInputError(f"{unit.url}: --classes-field needs WebDataset input (image files have no json field)")
        resolved.append(unit)
    class_names = tuple(found)
    if not class_names:
        raise AnnotateInputError(f"{name}: no class names (--classes, or --classes-field {classes_field!r} in the samples)")
    if len(class_names) > 254:
        raise AnnotateInputError(f"{name}: {len(class_names)} classes; label maps hold ids 1..254")
    return ImageInput(name, tuple(resolved), class_names)


def listed_classes(sample: dict[str, Any], classes_field: str) -> list[str]:
    """The class names listed under ``classes_field`` in a sample's ``json`` field."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    if "json" not in sample:
        raise AnnotateInputError(f"{where}: no json field to read --classes-field {classes_field!r} from")
    try:
        names = json.loads(sample["json"])[classes_field]
    except (ValueError, KeyError, TypeError):
        raise AnnotateInputError(f"{where}: json has no key {classes_field!r}") from None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise AnnotateInputError(f"{where}: json[{classes_field!r}] must be a list of class names, got {names!r}")
    return [n.strip() for n in names]


# ---- reading samples on the actor -------------------------------------------------------------------------------


def read_unit(unit: InputUnit, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples ``[start, stop)`` of a unit as raw fields (name -> bytes, plus ``__key__``), exactly as stored.
    A file unit becomes one sample whose image field is named by its suffix."""
    if unit.kind == "file":
        if start == 0 and stop >= 1:
            with fsspec.open(unit.url, "rb") as f:
                data = f.read()
            suffix = posixpath.splitext(unit.url.split("?", 1)[0])[1].lower()
            yield {"__key__": unit.key, "__url__": unit.url, IMAGE_SUFFIXES[suffix]: data}
        return
    from seediff.pipeline.readers import raw_samples

    for index, sample in enumerate(raw_samples(unit.url)):
        if index >= stop:
            return
        if index >= start:
            yield sample


# ---- the annotate plan --------------------------------------------------------------------------------------------


class AnnotatePlan(Plan):
    """The generate plan over input units instead of manifest rows: the same shard arithmetic (sample ids run over
    the units in order, shards are contiguous id ranges) and seeds. A sample's classes and prompt come from reading
    the input: ``samples(shard)`` runs on the actor, like the generate plan's."""

    def __init__(self, image_input: ImageInput, config: RunConfig):
        super().__init__(image_input.units, config.seed, config.samples_per_shard)
        self.input = image_input
        self.prefix, _, self.suffix = config.prompt_template.partition(PLACEHOLDER)
        self.classes_field = config.annotate.classes_field if config.annotate else None

    def sample(self, sample_id: int) -> SampleSpec:
        raise TypeError("an annotate sample is known only once its input is read: use samples(shard)")

    def samples(self, shard: ShardSpec) -> tuple[InputSample, ...]:
        """The shard's input samples, read from the units its id range covers, each with its spec."""
        read: list[InputSample] = []
        sample_id = shard.start
        while sample_id < shard.stop:
            unit_index, index = self.locate(sample_id)
            unit = self.input.units[unit_index]
            stop = min(unit.num_samples, index + shard.stop - sample_id)
            for fields in read_unit(unit, index, stop):
                spec = SampleSpec(sample_id, unit_index, index, sample_seed(self.global_seed, sample_id),
                                  self.row(unit, fields))
                read.append(InputSample(spec, fields))
                sample_id, index = sample_id + 1, index + 1
            if index < stop:
                raise AnnotateInputError(f"{unit.url}: {index} samples, the plan counted {unit.num_samples}; the input "
                                         "changed since the run was planned")
        return tuple(read)

    def row(self, unit: InputUnit, fields: dict[str, Any]) -> ManifestRow:
        """A one-sample manifest row labelling the sample's classes: the prompt template with ``{class_name}``
        replaced by the class phrases ("a photograph of a dog and cat")."""
        where = f"{unit.url}: sample {fields.get('__key__')}"
        if unit.classes is not None:
            names = list(unit.classes)
        elif self.classes_field:
            names = listed_classes(fields, self.classes_field)
        else:
            names = list(self.input.class_names)
        classes = tuple(LabelledClass(n, self.input.class_id(n, where)) for n in dict.fromkeys(names))
        parts: list[Any] = [self.prefix]
        for k, labelled in enumerate(classes):
            if k:
                parts.append(" and " if k == len(classes) - 1 else ", ")
            parts.append(Phrase(labelled.name, labelled.name))
        parts.append(self.suffix)
        source = PLACEHOLDER.join([self.prefix, self.suffix]).replace(PLACEHOLDER, ", ".join(c.name for c in classes))
        return ManifestRow(classes, 1, (Template(source, tuple(p for p in parts if p)),), "", 0)  # no manifest line
