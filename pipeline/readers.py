"""Reading a seediff dataset for training: (image, label mask, metadata) tuples from the plain WebDataset shards.

``segmentation_dataset`` streams shards (webdataset pipeline: shard shuffling, node/worker splitting, resampling);
``wids_dataset`` gives indexed random access from ``dataset.json``. Both decode ``mask.png`` as an 8-bit label map
(class ids on their objects, 0 background, 255 ignore): never through an RGB decoder, which would turn class ids into
colour floats. Both take a ``QualityFilter`` over the label-map quality fields (per-class pixel fractions, ignore
fraction, empty/degenerate flags, confidence); the indexed reader applies it from the parquet files alone.

Shards are opened with fsspec rather than webdataset's ``gopen``: any URL the writer could write (local, ``s3://``,
``gs://``, ``az://``, ``https://``) is readable with the same credentials and fsspec config (e.g.
``FSSPEC_S3_ENDPOINT_URL``), with no CLI tools in the image and no process-wide scheme registration.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from seediff.schemas.records import DATASET_JSON, PARQUET_SUFFIX, SIZES_JSON, SUCCESS, TAR_SUFFIX
from seediff.schemas.records import ANNOTATION_FIELD, MASK_FIELD, decode_mask, quality_columns

from seediff.schemas.records import IMAGE_FIELDS  # the one image-field vocabulary, in webdataset's order
SHARD_SHUFFLE_DEFAULT = 100  # shards held in the per-worker shard shuffle buffer (webdataset's own default)

Sample = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


# ---- shard list -----------------------------------------------------------------------------------------------


def shard_urls(source: str | Sequence[str]) -> list[str]:
    """Expand ``source`` to a list of shard URLs.

    ``source`` is a list of URLs/brace patterns, one brace pattern (``.../seediff-{000000..000009}.tar``), one
    ``.tar`` URL, or an output root / directory: its ``dataset.json`` (wids), else ``sizes.json``, else its ``*.tar``
    files (a run still in progress has no index yet)."""
    if not isinstance(source, str):
        urls = [url for item in source for url in braceexpand.braceexpand(item)]
    elif "{" in source or source.endswith(TAR_SUFFIX):
        urls = list(braceexpand.braceexpand(source))
    else:
        urls = _indexed_shards(source.rstrip("/"))
    if not urls:
        raise ValueError(f"{source}: no shards found")
    return urls


def _indexed_shards(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(f"{path}/{DATASET_JSON}"):
        return [_join(root, shard["url"]) for shard in _dataset_descriptor(root)["shardlist"]]
    if fs.exists(f"{path}/{SIZES_JSON}"):
        with fs.open(f"{path}/{SIZES_JSON}", "rb") as f:
            sizes = json.load(f)
        return [_join(root, name) for name in sorted(sizes) if name.endswith(TAR_SUFFIX)]
    found = sorted(fs.glob(f"{path}/*{TAR_SUFFIX}"))
    return [_join(root, posixpath.basename(p)) for p in found]


def _dataset_descriptor(root: str) -> dict[str, Any]:
    url = f"{root}/{DATASET_JSON}"
    with fsspec.open(url, "rb") as f:
        descriptor = json.load(f)
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("shardlist"), list):
        raise ValueError(f"{url}: expected a wids descriptor with a 'shardlist' list")
    return descriptor


def _join(root: str, url: str) -> str:
    """Shard URLs in the index are relative to the output root unless they carry a scheme or are absolute."""
    if "://" in url or url.startswith("/"):
        return url
    return f"{root}/{url}"


# ---- quality filter ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityFilter:
    """Keeps a sample when its label map passes every bound. Called on the quality columns of the parquet
    (``seediff.schemas.records.quality_columns`` of a sample's ``json`` gives the same fields)."""

    min_class_fraction: float = 0.0  # every labelled class covers at least this fraction of the image
    max_ignore_fraction: float = 1.0  # at most this fraction of pixels labelled 255
    min_confidence: float | None = None  # the weakest class's score (mean score on its pixels minus elsewhere)
    drop_empty: bool = True  # no class pixel at all
    drop_degenerate: bool = False  # some class had no usable seeds

    def __call__(self, columns: dict[str, Any]) -> bool:
        fractions = columns.get("class_pixel_fractions") or []
        if any(f is None or f < self.min_class_fraction for f in fractions) or not fractions:
            return False
        if (columns.get("ignore_fraction") or 0.0) > self.max_ignore_fraction:
            return False
        confidence = columns.get("confidence")
        if self.min_confidence is not None and (confidence is None or confidence < self.min_confidence):
            return False
        return not (self.drop_empty and columns.get("empty")) and not (self.drop_degenerate and columns.get("degenerate"))


def _passes(quality: QualityFilter) -> Callable[[dict[str, Any]], bool]:
    """A webdataset select stage's predicate on a raw sample: reads only its ``json`` field."""
    return lambda sample: quality(quality_columns(json.loads(_bytes(sample["json"]))))


# ---- decoding -------------------------------------------------------------------------------------------------


def decode_sample(sample: dict[str, Any]) -> Sample:
    """A raw WebDataset sample (field name -> bytes) -> (image float [3,H,W] in [0,1], mask long [H,W], metadata).
    Field names may carry wids' leading dot (``.jpg``). The metadata is ``mask.json`` in annotated outputs, else
    ``json``."""
    fields = {name.lstrip("."): value for name, value in sample.items()}
    key = fields.get("__key__", "?")
    image_field = next((name for name in IMAGE_FIELDS if name in fields), None)
    metadata_field = record_field(fields)
    if image_field is None or MASK_FIELD not in fields or metadata_field not in fields:
        raise ValueError(f"sample {key}: expected an image ({'/'.join(IMAGE_FIELDS)}), mask.png and json (or "
                         f"{ANNOTATION_FIELD}) fields, got {sorted(fields)}")
    with Image.open(io.BytesIO(_bytes(fields[image_field]))) as im:
        rgb = np.array(im.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    mask = torch.from_numpy(decode_mask(_bytes(fields[MASK_FIELD]))).long()
    metadata = json.loads(_bytes(fields[metadata_field]))
    return image, mask, metadata


def record_field(fields: dict[str, Any]) -> str:
    """The field holding a sample's seediff record: ``mask.json`` in annotated outputs (their ``json``, if any, is
    the input's own), else ``json``."""
    return ANNOTATION_FIELD if ANNOTATION_FIELD in fields else "json"


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's seediff record (see ``record_field``), parsed."""
    return json.loads(_bytes(sample[record_field(sample)]))


def _bytes(value: bytes | io.IOBase) -> bytes:
    """webdataset hands fields over as bytes, wids as file-like objects."""
    return value if isinstance(value, bytes) else value.read()


# ---- streaming (webdataset) -------------------------------------------------------------------------------------


def _open_with_fsspec(sources: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Pipeline stage: dict(url=...) -> dict(url=..., stream=...). The stream stays open while the tar expander
    reads it and closes when the next shard is requested."""
    for source in sources:
        url = source["url"]
        try:
            opened = fsspec.open(url, "rb")
            stream = opened.open()
        except Exception as exn:  # noqa: BLE001 - the handler decides (warn_and_continue skips the shard)
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break
        with stream:
            yield {**source, "stream": stream}


def _tar_stages(handler: Callable[[Exception], bool]) -> list[Any]:
    """dict(url=...) -> raw samples: {"__key__", "__url__", field name -> bytes}."""
    return [
        wds.pipelinefilter(_open_with_fsspec)(handler),
        wds.pipelinefilter(wds.tariterators.tar_file_expander)(handler=handler),
        wds.pipelinefilter(wds.tariterators.group_by_keys)(handler=handler),
    ]


def raw_samples(urls: str | Sequence[str], handler: Callable[[Exception], bool] = wds.reraise_exception):
    """Undecoded samples (field name -> bytes) of every shard in order, no splitting or shuffling: for tools that
    look at the dataset (preview) rather than train on it."""
    return wds.DataPipeline(wds.SimpleShardList(shard_urls(urls)), *_tar_stages(handler))


def segmentation_dataset(
    urls: str | Sequence[str],
    *,
    shuffle_shards: int | bool = SHARD_SHUFFLE_DEFAULT,
    resampled: bool = False,
    epoch_length: int | None = None,
    shuffle_buffer: int = 0,
    split_by_node: bool = True,
    handler: Callable[[Exception], bool] = wds.warn_and_continue,
    quality: QualityFilter | None = None,
) -> wds.DataPipeline:
    """A webdataset pipeline yielding ``(image, mask, metadata)``; see ``decode_sample``.

    ``urls``: anything ``shard_urls`` accepts (output root, directory, brace pattern, list).
    ``shuffle_shards``: size of the shard shuffle buffer (True = 100; False/0 = file order, for validation).
    Without ``resampled``, shards are split over nodes (``torch.distributed`` ranks, when ``split_by_node``) and over
    DataLoader workers, so one pass yields every sample exactly once. Give each rank's worker at least one shard.
    ``resampled=True``: every worker draws shards with replacement forever; ``epoch_length`` (required then) is the
    number of samples each worker yields per epoch — the usual choice for multi-node training.
    ``shuffle_buffer``: in-memory sample shuffle buffer (0 = off).
    ``handler``: what to do on a corrupt shard/sample; ``wds.warn_and_continue`` skips it, ``wds.reraise_exception``
    stops.
    ``quality``: drop samples whose label map fails the filter (decided from the ``json`` field, before decoding).
    """
    shards = shard_urls(urls)
    if resampled and epoch_length is None:
        raise ValueError("segmentation_dataset: resampled=True needs epoch_length (samples per worker per epoch)")
    shard_buffer = SHARD_SHUFFLE_DEFAULT if shuffle_shards is True else int(shuffle_shards)
    stages: list[Any]
    if resampled:
        stages = [wds.ResampledShards(shards)]
    else:
        stages = [wds.SimpleShardList(shards)]
        if split_by_node:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
        if shard_buffer > 0:
            # After splitting, so each node/worker shuffles its own shards and no cross-node agreement is needed.
            stages.append(wds.shuffle(shard_buffer))
    stages += _tar_stages(handler)
    if quality is not None:
        stages.append(wds.select(_passes(quality)))
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer))
    stages.append(wds.map(decode_sample, handler=handler))
    dataset = wds.DataPipeline(*stages)
    return dataset.with_epoch(epoch_length) if epoch_length is not None else dataset


# ---- indexed (wids) ---------------------------------------------------------------------------------------------


def wids_dataset(out_url: str, quality: QualityFilter | None = None, **kwargs: Any):
    """Indexed access (``len``, ``ds[i]``, any sampler) from the run's ``dataset.json``, samples mapped to the same
    ``(image, mask, metadata)`` tuples. Remote shards are downloaded whole into wids' cache (``cache_dir=...``;
    default ``$WIDS_CACHE`` or ``/tmp/_wids_cache``); ``kwargs`` go to ``wids.ShardListDataset``. With ``quality``,
    a ``torch.utils.data.Subset`` of the samples that pass, chosen from the shards' parquet files (no tar is read)."""
    import wids  # imported here: only this reader needs it

    root = out_url.rstrip("/")
    descriptor = _dataset_descriptor(root)
    shards = [{**shard, "url": _join(root, shard["url"])} for shard in descriptor["shardlist"]]
    dataset = wids.ShardListDataset(shards, dataset_name=descriptor.get("name"), transformations=[decode_sample],
                                    **kwargs)
    if quality is None:
        return dataset
    return torch.utils.data.Subset(dataset, passing_indices([s["url"] for s in shards], quality))


def passing_indices(shard_urls: Sequence[str], quality: QualityFilter) -> list[int]:
    """Positions, in the concatenated shards, of the samples that pass ``quality``: each shard's parquet lists its
    attempted samples in the tar's order; the successful ones are the tar's samples."""
    kept, position = [], 0
    for url in shard_urls:
        with fsspec.open(url.removesuffix(TAR_SUFFIX) + PARQUET_SUFFIX, "rb") as f:
            rows = pq.read_table(f).to_pylist()
        for row in rows:
            if row["status"] == SUCCESS:
                if quality(row):
                    kept.append(position)
                position += 1
    return kept
