r"""Folder layouts of labelled segmentation datasets, read for ``seediff eval`` and written by ``seediff export``.

``voc``: PASCAL VOC 2012's own layout, which segmentation trainers (mmsegmentation, torchvision, DeepLab ports) read::

    ROOT/JPEGImages/<id>.jpg                   the images
    ROOT/SegmentationClass/<id>.png            palette ("P") PNG: pixel = class id, 255 = ignore (object borders)
    ROOT/ImageSets/Segmentation/<split>.txt    one image id per line
    ROOT/labelmap.txt                          optional class list (CVAT/Datumaro form ``name:r,g,b::``);
                                               without it, the 21 VOC classes

``labels``: COCO-Stuff / ADE20K-style label folders: images under ``ROOT/images/`` and label maps (8-bit PNG, pixel =
class id, 255 = ignore) under ``ROOT/labels/`` (or ``ROOT/annotations/``) with the same relative path and stem, and a
class list (``ROOT/classes.txt`` or ``--classes-file``).

A class list is a text file with one class per line, the line number (from 0) being the label value; a line may be
a plain name or a labelmap line (``name:r,g,b:parts:actions``); ``#`` lines are comments and an ``ignored`` line
(Datumaro's name for 255) is skipped. A backslash escapes the next character (``a\:b``, ``\#hash``, ``x\,y``):
``escape_class_name`` writes names so, ``split_escaped`` reads them. Label value 0 is the
background class, scored like any other, as in VOC.

Everything goes through fsspec, so ROOT and the export directory may be any URL."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from seediff.pipeline.readers import IMAGE_FIELDS, raw_samples, sample_record
from seediff.schemas.config import ConfigError
from seediff.schemas.records import MASK_FIELD, decode_mask, sample_classes
from seediff.storage import output_fs, write_file

IGNORE = 255
IGNORED_NAME = "ignored"  # VOC's name for label 255 in Datumaro's labelmap.txt; a class list skips it
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_IMAGES, VOC_LABELS, VOC_SETS, LABELMAP = "JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "labelmap.txt"
LABELS_IMAGES, LABELS_LABELS, CLASSES_TXT = "images", ("labels", "annotations"), "classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
JPEG_QUALITY = 95  # for images that are not JPEG in the output root (png/webp runs); JPEGs are copied byte for byte


class LayoutError(ConfigError):
    """A dataset root or class list that cannot be read as its layout says; the message names the file."""


@dataclass(frozen=True)
class LabelledImage:
    name: str  # image id: VOC's id, or the path below images/ without its suffix
    image: str  # URL of the image file
    label: str  # URL of the label map


@dataclass(frozen=True)
class LabelledDataset:
    root: str
    layout: str  # "voc" | "labels"
    split: str | None  # VOC image-set name
    class_names: tuple[str, ...]  # index = label value
    images: tuple[LabelledImage, ...]


# ---- class lists --------------------------------------------------------------------------------------------------


def read_class_list(url: str) -> tuple[str, ...]:
    """Class names by label value from a class list file (see the module docstring)."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    names = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):  # an escaped "\#" starts a name, not a comment
            continue
        name = split_escaped(text, ":")[0].strip()
        if not name:
            raise LayoutError(f"{url}:{number}: empty class name")
        if name != IGNORED_NAME:  # the label of value 255, not a class
            names.append(name)
    if not names:
        raise LayoutError(f"{url}: no class names")
    if len(names) > IGNORE:
        raise LayoutError(f"{url}: {len(names)} classes; label maps hold at most {IGNORE} (255 is ignore)")
    return tuple(names)


ESCAPED = "\\:,#"  # what a class name written into a class list escapes with a backslash


def escape_class_name(name: str) -> str:
    r"""A class name as a class list (labelmap.txt, classes.txt, ``--classes a,b``) writes it: ``\``, ``:``, ``,``
    and ``#`` escaped with a backslash, so ``a:b`` is not cut at its colon, ``#hash`` is not a comment, ``x,y`` is
    one name; ``split_escaped`` reads it back. Names without these characters are written as they are."""
    return "".join(f"\\{c}" if c in ESCAPED else c for c in name)


def split_escaped(text: str, separator: str) -> list[str]:
    r"""``text`` split at each ``separator`` not escaped by a backslash, each part unescaped (``\x`` -> ``x``)."""
    parts, current, chars = [], [], iter(text)
    for c in chars:
        if c == "\\":
            current.append(next(chars, "\\"))
        elif c == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    return [*parts, "".join(current)]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 values): colour i spreads the bits of i over R, G, B, high bits first;
    255 (ignore) is (224, 224, 192)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def labelmap_text(class_names: tuple[str, ...]) -> str:
    """CVAT/Datumaro ``labelmap.txt``: one ``name:r,g,b::`` line per class, in label order, VOC colours, then
    Datumaro's ``ignored`` line for the colour of 255 (without it Datumaro refuses the border colour)."""
    palette = voc_palette()
    lines = ["# label:color_rgb:parts:actions"]
    for i, name in [*enumerate(class_names), (IGNORE, IGNORED_NAME)]:
        lines.append(f"{escape_class_name(name)}:{palette[3 * i]},{palette[3 * i + 1]},{palette[3 * i + 2]}::")
    return "\n".join(lines) + "\n"


# ---- reading ------------------------------------------------------------------------------------------------------


def read_label_map(url: str) -> np.ndarray:
    """A label PNG -> H x W uint8 label values: the palette indices of a "P" image, the values of an "L" image.
    Colour-coded (RGB) label images are refused: their colours would have to be mapped back to ids."""
    with fsspec.open(url, "rb") as f, Image.open(f) as im:
        if im.mode not in ("P", "L"):
            raise LayoutError(f"{url}: label map must be an indexed (P) or 8-bit grey (L) PNG, got mode {im.mode}")
        return np.array(im, dtype=np.uint8)


def iter_labelled(dataset: LabelledDataset) -> Iterator[tuple[LabelledImage, np.ndarray]]:
    """(image record, ground-truth label map) pairs in dataset order."""
    for item in dataset.images:
        yield item, read_label_map(item.label)


def open_labelled_dataset(root: str, layout: str, split: str | None = None,
                          classes_file: str | None = None) -> LabelledDataset:
    """List a labelled dataset without reading any image. Raises FileNotFoundError/LayoutError naming the file."""
    root = root.rstrip("/")
    if layout == "voc":
        return _open_voc(root, split, classes_file)
    if layout == "labels":
        return _open_labels(root, classes_file)
    raise LayoutError(f"--layout: expected voc or labels, got {layout!r}")


def _open_voc(root: str, split: str | None, classes_file: str | None) -> LabelledDataset:
    fs, path = fsspec.core.url_to_fs(root)
    sets = f"{path}/{VOC_SETS}"
    available = sorted(posixpath.basename(p)[:-4] for p in fs.glob(f"{sets}/*.txt"))
    if split is None:
        if not available:
            raise FileNotFoundError(f"{root}/{VOC_SETS}: no image-set lists (*.txt); not a VOC layout")
        split = "val" if "val" in available else available[0] if len(available) == 1 else None
        if split is None:
            raise LayoutError(f"{root}/{VOC_SETS}: several image sets {available} and no val.txt; pass --split")
    list_path = f"{sets}/{split}.txt"
    if not fs.exists(list_path):
        raise FileNotFoundError(f"{root}/{VOC_SETS}/{split}.txt: no such image set (found: {available})")
    ids = [line.split()[0] for line in fs.cat_file(list_path).decode("utf-8").splitlines() if line.strip()]
    labelmap = classes_file or (f"{root}/{LABELMAP}" if fs.exists(f"{path}/{LABELMAP}") else None)
    class_names = read_class_list(labelmap) if labelmap else VOC_CLASSES
    images = tuple(
        LabelledImage(i, f"{root}/{VOC_IMAGES}/{i}.jpg", f"{root}/{VOC_LABELS}/{i}.png") for i in ids
    )
    for item in images[:1]:  # an early, clear error for a wrong root; every file is opened later anyway
        if not fs.exists(f"{path}/{VOC_IMAGES}/{item.name}.jpg"):
            raise FileNotFoundError(f"{item.image}: listed in {split}.txt but missing")
    return LabelledDataset(root, "voc", split, class_names, images)


def _open_labels(root: str, classes_file: str | None) -> LabelledDataset:
    fs, path = fsspec.core.url_to_fs(root)
    label_dir = next((d for d in LABELS_LABELS if fs.isdir(f"{path}/{d}")), None)
    if not fs.isdir(f"{path}/{LABELS_IMAGES}") or label_dir is None:
        raise FileNotFoundError(f"{root}: expected {LABELS_IMAGES}/ and {' or '.join(LABELS_LABELS)}/ folders")
    classes = classes_file or f"{root}/{CLASSES_TXT}"
    if classes_file is None and not fs.exists(f"{path}/{CLASSES_TXT}"):
        raise FileNotFoundError(f"{root}/{CLASSES_TXT}: missing; pass --classes-file")
    labels = {_stem(p, f"{path}/{label_dir}"): p for p in fs.find(f"{path}/{label_dir}") if p.endswith(".png")}
    images = []
    for p in sorted(fs.find(f"{path}/{LABELS_IMAGES}")):
        if not p.lower().endswith(IMAGE_SUFFIXES):
            continue
        name = _stem(p, f"{path}/{LABELS_IMAGES}")
        if name not in labels:
            raise FileNotFoundError(f"{root}/{label_dir}/{name}.png: missing (the label map of {p})")
        images.append(LabelledImage(name, _url(fs, p), _url(fs, labels[name])))
    if not images:
        raise FileNotFoundError(f"{root}/{LABELS_IMAGES}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledDataset(root, "labels", None, read_class_list(classes), tuple(images))


def _stem(path: str, below: str) -> str:
    return posixpath.splitext(posixpath.relpath(path, below))[0]


def _url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


# ---- writing: export an output root as a VOC layout ----------------------------------------------------------------


def export_voc(out_url: str, directory: str, split: str = "train") -> dict[str, Any]:
    """Write every sample of a seediff output root (``generate`` or ``annotate``) as a VOC layout under
    ``directory``: ``JPEGImages/<key>.jpg`` (JPEG bytes copied, other formats re-encoded), palette label maps,
    ``ImageSets/Segmentation/<split>.txt`` and ``labelmap.txt`` (class names from the samples' metadata, ids
    without a name are ``class_<id>``). Returns a summary."""
    fs, root = output_fs(directory)
    palette = voc_palette()
    names: dict[int, str] = {0: "background"}
    ids = []
    for sample in raw_samples(out_url):
        image_id = sample["__key__"].replace("/", "_")
        labels = decode_mask(sample[MASK_FIELD])
        names.update(sample_classes(sample_record(sample)))
        write_file(fs, f"{root}/{VOC_IMAGES}/{image_id}.jpg", _jpeg(sample))
        write_file(fs, f"{root}/{VOC_LABELS}/{image_id}.png", _palette_png(labels, palette))
        ids.append(image_id)
    if not ids:
        raise LayoutError(f"{out_url}: no samples to export")
    used = max(names)
    class_names = tuple(names.get(i, f"class_{i}") for i in range(used + 1))
    write_file(fs, f"{root}/{VOC_SETS}/{split}.txt", ("\n".join(ids) + "\n").encode())
    write_file(fs, f"{root}/{LABELMAP}", labelmap_text(class_names).encode())
    return {"directory": directory, "split": split, "images": len(ids), "classes": list(class_names)}


def _jpeg(sample: dict[str, Any]) -> bytes:
    field = next(f for f in IMAGE_FIELDS if f in sample)
    if field in ("jpg", "jpeg"):
        return sample[field]
    with Image.open(io.BytesIO(sample[field])) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()


def _palette_png(labels: np.ndarray, palette: list[int]) -> bytes:
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(palette)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
