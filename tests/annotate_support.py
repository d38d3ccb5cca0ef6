"""Inputs for the annotate tests: real JPEG and PNG images of several sizes and aspect ratios, written as WebDataset
shards (each sample's classes three ways: names in its json, indexes into CLASS_TABLE in its cls field, marked phrases
in its txt caption) and as an image folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

# (width, height, format, class names): portrait, landscape, square, panorama, tiny
IMAGES = (
    (96, 64, "jpg", ["dog", "cat"]),
    (48, 80, "png", ["cat"]),
    (64, 64, "jpg", ["dog"]),
    (120, 40, "png", ["bird", "dog"]),
    (30, 22, "jpg", ["cat"]),
)
CLASS_TABLE = ("dog", "cat", "bird")  # what the cls fields index, 0 = dog
PHRASES = {"dog": ("{puppy:dog}", "puppy"), "cat": ("{cat}", "cat"), "bird": ("{bird}", "bird")}  # marked, rendered


def cls_field(index: int, classes: list[str]) -> bytes:
    """The sample's classes as indexes into CLASS_TABLE, separated by commas or spaces (both are read)."""
    return (", " if index % 2 else " ").join(str(CLASS_TABLE.index(c)) for c in classes).encode()


def caption(index: int, classes: list[str], marked: bool = True) -> str:
    """A caption with each class's phrase marked (dog as "puppy"), or as its prompt renders it; "dog" also appears
    unmarked, which is no class phrase."""
    return f"dog-eared photo {index} of " + " and ".join(f"a {PHRASES[c][0 if marked else 1]}" for c in classes)


def image_bytes(index: int, width: int, height: int, fmt: str) -> bytes:
    """A smooth image with a bright disc, different per index."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(index)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    disc = ((y - cy) ** 2 + (x - cx) ** 2) < (min(width, height) / 4) ** 2
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    rgb[disc] = (240, 220, 60)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format={"jpg": "JPEG", "png": "PNG"}[fmt])
    return buf.getvalue()


def write_input_shards(directory: Path, per_shard: int = 2) -> list[dict]:
    """IMAGES as shards ``in-000000.tar`` ... of ``per_shard`` samples; returns the samples as written."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (width, height, fmt, classes) in enumerate(IMAGES):
        meta = {"caption": f"photo {i}", "labels": classes, "source_id": 1000 + i}
        samples.append({
            "__key__": f"img{i:04d}",
            fmt: image_bytes(i, width, height, fmt),
            "json": json.dumps(meta, indent=1).encode(),  # unusual formatting: must be kept byte for byte
            "txt": f"{caption(i, classes)}\n".encode(),
            "cls": cls_field(i, classes),
        })
    for shard in range(0, len(samples), per_shard):
        with wds.TarWriter(str(directory / f"in-{shard // per_shard:06d}.tar"), encoder=False) as sink:
            for sample in samples[shard : shard + per_shard]:
                sink.write(sample)
    return samples


def write_image_folder(directory: Path) -> list[Path]:
    """IMAGES as files in two subfolders (sorted order = IMAGES order)."""
    paths = []
    for i, (width, height, fmt, _) in enumerate(IMAGES):
        path = directory / ("a" if i < 3 else "b") / f"{i:02d}.{'jpeg' if fmt == 'jpg' else fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, width, height, fmt))
        paths.append(path)
    return paths
