"""Reading a seediff dataset for training: (image, label mask, metadata) tuples from the plain WebDataset shards.

``segmentation_dataset`` streams shards (webdataset pipeline: shard shuffling, node/worker splitting, resampling);
``wids_dataset`` gives indexed random access from ``dataset.json``. Both decode ``mask.png`` as an 8-bit label map
(class ids on their objects, 0 background, 255 ignore): never through an RGB decoder, which would turn class ids into
colour floats. ``dtype="uint8"`` returns the stored pixels and label values as they are (the fast path: a training
job normalises on its GPU); ``"float32"`` the image in [0, 1] and the labels as int64. JPEGs decode with simplejpeg
(libjpeg-turbo with Pillow's default settings: identical pixels, twice Pillow's rate in bench/bench_readers.py),
other images with Pillow. Both readers take a ``QualityFilter`` over the label-map quality fields
(per-class pixel fractions, ignore fraction, empty/degenerate flags, confidence), read from the sample's seediff
record (the indexed reader: from the parquet files alone).

Shards are opened with fsspec rather than webdataset's ``gopen``: any URL the writer could write (local, ``s3://``,
``gs://``, ``az://``, ``https://``) is readable with the same credentials and fsspec config (e.g.
``FSSPEC_S3_ENDPOINT_URL``), with no CLI tools in the image and no process-wide scheme registration.
"""

from __future__ import annotations

import collections
import contextlib
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
import simplejpeg
import torch
import webdataset as wds
from PIL import Image

from seediff.schemas.records import DATASET_JSON, PARQUET_SUFFIX, SIZES_JSON, SUCCESS, TAR_SUFFIX
from seediff.schemas.records import ANNOTATION_FIELD, IMAGE_FIELDS, MASK_FIELD, decode_mask, quality_columns

SHARD_SHUFFLE_DEFAULT = 100  # shards held in the per-worker shard shuffle buffer (webdataset's own default)
DTYPES = ("uint8", "float32")
IMAGE_LAYOUTS = ("chw", "hwc")

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
    """A webdataset select stage's predicate on a raw sample: reads only its seediff record (``record_field``),
    never an annotated input's own ``json``."""
    return lambda sample: quality(quality_columns(sample_record(sample)))


# ---- decoding -------------------------------------------------------------------------------------------------


class SampleDecoder:
    """A raw WebDataset sample (field name -> bytes) -> (image, label mask, metadata).

    ``dtype="uint8"``: image uint8 [3,H,W] (``image_layout="hwc"``: [H,W,3]) with the stored pixels, mask uint8
    [H,W] with the stored label values. ``"float32"``: image float32 in [0,1], mask int64. Field names may carry
    wids' leading dot (``.jpg``). The image is the first of ``IMAGE_FIELDS`` present (the field annotate labels);
    the metadata is the seediff record (``record_field``). A class, not a closure, so DataLoader workers can pickle
    it."""

    def __init__(self, dtype: str = "float32", image_layout: str = "chw"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout: expected one of {IMAGE_LAYOUTS}, got {image_layout!r}")
        self.dtype, self.image_layout = dtype, image_layout

    def __call__(self, sample: dict[str, Any]) -> Sample:
        fields = {name.lstrip("."): value for name, value in sample.items()}
        key = fields.get("__key__", "?")
        image_field = next((name for name in IMAGE_FIELDS if name in fields), None)
        metadata_field = record_field(fields)
        if image_field is None or MASK_FIELD not in fields or metadata_field not in fields:
            raise ValueError(f"sample {key}: expected an image ({'/'.join(IMAGE_FIELDS)}), mask.png and json (or "
                             f"{ANNOTATION_FIELD}) fields, got {sorted(fields)}")
        image = torch.from_numpy(decode_rgb(_bytes(fields[image_field]), image_field))
        if self.image_layout == "chw":
            image = image.permute(2, 0, 1)
        mask = torch.from_numpy(decode_mask(_bytes(fields[MASK_FIELD])))
        if self.dtype == "float32":
            image, mask = image.float().div_(255.0), mask.long()
        return image, mask, json.loads(_bytes(fields[metadata_field]))


decode_sample = SampleDecoder()  # the float32 form


def decode_rgb(data: bytes, field: str) -> np.ndarray:
    """An encoded image -> a writable H x W x 3 uint8 array (torch.from_numpy wants writable memory)."""
    if field in ("jpg", "jpeg") and simplejpeg.is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:  # what libjpeg-turbo cannot turn into RGB (CMYK, say): Pillow converts it
            pass
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


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
    dtype: str = "float32",
    image_layout: str = "chw",
) -> wds.DataPipeline:
    """A webdataset pipeline yielding ``(image, mask, metadata)``; see ``SampleDecoder``.

    ``urls``: anything ``shard_urls`` accepts (output root, directory, brace pattern, list).
    ``shuffle_shards``: size of the shard shuffle buffer (True = 100; False/0 = file order, for validation).
    Without ``resampled``, shards are split over nodes (``torch.distributed`` ranks, when ``split_by_node``) and over
    DataLoader workers, so one pass yields every sample exactly once. Give each rank's worker at least one shard.
    ``resampled=True``: every worker draws shards with replacement forever; ``epoch_length`` (required then) is the
    number of samples each worker yields per epoch — the usual choice for multi-node training.
    ``shuffle_buffer``: in-memory sample shuffle buffer (0 = off).
    ``handler``: what to do on a corrupt shard/sample; ``wds.warn_and_continue`` skips it, ``wds.reraise_exception``
    stops.
    ``quality``: drop samples whose label map fails the filter (decided from the seediff record, before decoding).
    ``dtype``: ``"uint8"`` (image uint8 [3,H,W], mask uint8 [H,W]: the stored values, the fast path) or
    ``"float32"`` (image in [0,1], mask int64). ``image_layout``: ``"chw"`` or ``"hwc"``.
    """
    decode = SampleDecoder(dtype, image_layout)
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
    stages.append(wds.map(decode, handler=handler))
    dataset = wds.DataPipeline(*stages)
    return dataset.with_epoch(epoch_length) if epoch_length is not None else dataset


# ---- indexed (wids) ---------------------------------------------------------------------------------------------


def wids_dataset(out_url: str, quality: QualityFilter | None = None, *, dtype: str = "float32",
                 image_layout: str = "chw", **kwargs: Any):
    """Indexed access (``len``, ``ds[i]``, any sampler) from the run's ``dataset.json``, samples mapped to the same
    ``(image, mask, metadata)`` tuples (``dtype`` and ``image_layout`` as in ``segmentation_dataset``). Local
    shards are read in place (nothing is copied or written); remote shards are downloaded whole into wids' cache
    (``cache_dir=...``; default ``$WIDS_CACHE`` or ``/tmp/_wids_cache``). ``kwargs`` go to
    ``wids.ShardListDataset``. With ``quality``, a ``torch.utils.data.Subset`` of the samples that pass, chosen from
    the shards' parquet files (no tar is read)."""
    import wids  # imported here: only this reader needs it

    root = out_url.rstrip("/")
    descriptor = _dataset_descriptor(root)
    shards = [{**shard, "url": _join(root, shard["url"])} for shard in descriptor["shardlist"]]
    in_place = all(_is_local(shard["url"]) for shard in shards) and not ({"cache_dir", "localname"} & kwargs.keys())
    if in_place:
        kwargs["localname"] = str  # so wids makes no cache folder; its shard cache is replaced below
    with contextlib.redirect_stderr(io.StringIO()):  # wids prints its descriptor on every construction
        dataset = wids.ShardListDataset(shards, dataset_name=descriptor.get("name"),
                                        transformations=[SampleDecoder(dtype, image_layout)], **kwargs)
    if in_place:
        dataset.cache = _InPlaceShards(kwargs.get("lru_size", 10))
    if quality is None:
        return dataset
    return torch.utils.data.Subset(dataset, passing_indices([s["url"] for s in shards], quality))


def _is_local(url: str) -> bool:
    return fsspec.core.url_to_fs(url)[0].protocol in ("file", ("file", "local"))


class _InPlaceShards:
    """wids' shard cache (``ShardListDataset.cache``) for local roots: a tar is indexed where it lies, where wids'
    own would copy it into its cache folder and put a lock file beside it. Keeps at most ``size`` open, like wids'."""

    def __init__(self, size: int):
        self.size, self.shards = size, collections.OrderedDict()
        self.accesses = self.misses = 0
        self.last_missed = False

    def get_shard(self, url: str) -> Any:
        from wids.wids import IndexedTarSamples

        self.accesses += 1
        self.last_missed = url not in self.shards
        if self.last_missed:
            self.misses += 1
            self.shards[url] = IndexedTarSamples(path=fsspec.core.url_to_fs(url)[1])
            if len(self.shards) > self.size:
                self.shards.popitem(last=False)[1].close()
        self.shards.move_to_end(url)
        return self.shards[url]

    def clear(self) -> None:
        while self.shards:
            self.shards.popitem()[1].close()


def passing_indices(shard_urls: Sequence[str], quality: QualityFilter) -> list[int]:
    """Positions, in the concatenated shards, of the samples that pass ``quality``."""
    return [position for position, (_, row) in enumerate(successful_rows(shard_urls)) if quality(row)]


def successful_rows(shard_urls: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(shard URL, parquet row) of every sample the tars hold, in their order: each shard's parquet lists its
    attempted samples in the tar's order; the successful ones are the tar's samples."""
    for url in shard_urls:
        with fsspec.open(url.removesuffix(TAR_SUFFIX) + PARQUET_SUFFIX, "rb") as f:
            # on this thread: an Arrow pool task releasing a Python file buffer at interpreter exit aborts
            rows = pq.read_table(f, use_threads=False, pre_buffer=False).to_pylist()
        yield from ((url, row) for row in rows if row["status"] == SUCCESS)
