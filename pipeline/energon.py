"""Megatron-Energon's index of an output root, written in place beside its tars: ``seediff export OUT --layout
energon [--quality KEY=VALUE ...]``.

Energon reads WebDataset tars unchanged once ``energon prepare`` has indexed them. This writes the same files, with
nothing copied: ``OUT/.nv-meta/.info.json`` (samples per shard), ``index.sqlite`` + ``index.uuid`` (the per-sample
index: each sample's offset and parts) and, beside each tar, its ``.tar.idx`` (sample offsets) — built by energon's
own preparation code (``WebdatasetPreparator``, what ``energon prepare`` runs), so they are what the installed
energon expects — then ``split.yaml`` (every committed shard in the ``train`` split; the samples a ``QualityFilter``
rejects, chosen from the parquet files, under ``exclude:``) and ``dataset.yaml``, whose sample type is
``SegmentationSample`` below, loaded by ``sample_loader``.

Energon is needed only here (``pip install 'seediff[energon]'``): this module imports it, the rest of seediff does
not."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import fsspec
import numpy as np
import torch
import yaml
from megatron.energon import Sample
from megatron.energon.edataclass import edataclass
from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator
from PIL import Image

from seediff.pipeline.readers import QualityFilter, record_field, shard_urls, successful_rows
from seediff.schemas.records import ANNOTATION_FIELD, IMAGE_FIELDS, MASK_FIELD, decode_mask

META = ".nv-meta"
SPLIT = "train"  # every shard: a seediff output is one training set; hold-out sets are other outputs
# The parts a sample loads: any image field (which one is the sample's is decided in sample_loader), the label map
# and both record fields (annotate keeps an input's own json beside seediff's mask.json).
PARTS = (*IMAGE_FIELDS, MASK_FIELD, "json", ANNOTATION_FIELD)
LOADER_FILE = "sample_loader.py"  # energon loads sample_loader from a file in .nv-meta; it imports this module's
LOADER_SOURCE = "from seediff.pipeline.energon import sample_loader  # noqa: F401 - looked up by energon\n"


@edataclass
class SegmentationSample(Sample):
    """One seediff sample in energon: ``image`` as the task encoder's decoder makes it (energon's default,
    ``torchrgb``: float [3, H, W] in [0, 1]); ``mask`` always the label map's values, uint8 [H, W] (class ids, 0
    background, 255 ignore), whatever the image decoder did to ``mask.png``; ``metadata`` the seediff record."""

    image: Any
    mask: torch.Tensor
    metadata: dict


def sample_loader(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``SegmentationSample`` from the parts energon read (and its decoder decoded): the first of
    ``IMAGE_FIELDS`` present (the field annotate labels), the label map, the seediff record (``record_field``)."""
    image_field = next(name for name in IMAGE_FIELDS if name in raw)
    return {"image": raw[image_field], "mask": torch.from_numpy(label_values(raw[MASK_FIELD])),
            "metadata": _record(raw[record_field(raw)])}


def label_values(value: Any) -> np.ndarray:
    """The H x W uint8 label values of ``mask.png`` as energon hands it over: raw bytes (no decoder), or what an
    image decoder made of the 8-bit grey PNG — a PIL image, or an array/tensor with identical channels, uint8 or
    scaled to [0, 1] (exact: v / 255 * 255 rounds back to v)."""
    if isinstance(value, bytes):
        return decode_mask(value)
    if isinstance(value, Image.Image):
        return np.array(value.convert("L"))
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3:  # channels first (torch decoders) or last (numpy decoders), all equal for a grey image
        array = array[0] if isinstance(value, torch.Tensor) else array[..., 0]
    if array.dtype != np.uint8:
        array = np.rint(array.astype(np.float64) * 255)
    return np.ascontiguousarray(array, dtype=np.uint8)


def _record(value: Any) -> dict:
    return value if isinstance(value, dict) else json.loads(value)


def export_energon(out_url: str, quality: QualityFilter | None = None) -> dict[str, Any]:
    """Index the output root ``out_url`` for energon in place (see the module docstring). Returns a summary."""
    root = out_url.rstrip("/")
    urls = shard_urls(root)  # the committed shards, from dataset.json
    names = {url: url.removeprefix(f"{root}/") for url in urls}  # as energon names them: relative to the root
    with contextlib.redirect_stdout(io.StringIO()):  # energon prints its progress
        WebdatasetPreparator.prepare_dataset(root, list(names.values()), split_parts_patterns=[(SPLIT, ".*")],
                                             workers=1)
    rows = list(successful_rows(urls))
    excluded = [] if quality is None else [f"{names[url]}/{row['key']}" for url, row in rows if not quality(row)]
    # val and test present and empty, as energon prepare writes them for a train-only ratio (lint checks all three)
    split = {"split_parts": {SPLIT: list(names.values()), "val": [], "test": []}, "exclude": excluded}
    dataset = {
        "sample_type": {"__module__": __name__, "__class__": SegmentationSample.__name__},
        "sample_loader": f"{LOADER_FILE}:sample_loader",
        "part_filter": list(PARTS),
    }
    for name, text in (("split.yaml", yaml.safe_dump(split, sort_keys=False)),
                       ("dataset.yaml", yaml.safe_dump(dataset, sort_keys=False)), (LOADER_FILE, LOADER_SOURCE)):
        with fsspec.open(f"{root}/{META}/{name}", "w") as f:
            f.write(text)
    return {"root": root, "shards": len(names), "samples": len(rows), "excluded": len(excluded)}
