"""Reader throughput against a plain webdataset uint8 decode of the same shards, measured in one run.

Writes shards with the real data plane (encode_sample -> ShardWriter -> write_index): 512x384 JPEG q95 photo-like
images, label maps with two classes and an ignore border, full records. Then, at 0 and 2 DataLoader workers, each
repeat timing every reader once in turn (so load changes hit them alike), samples/s of:

* ``webdataset uint8``: ``wds.WebDataset(...).decode(mask.png handler, "torchrgb8").to_tuple("jpg", "mask.png",
  "json")``, webdataset's own Pillow decode to uint8 CHW (the baseline);
* ``seediff uint8``: ``segmentation_dataset(root, shuffle_shards=0, dtype="uint8")``;
* ``seediff float32``: the same with ``dtype="float32"`` (image in [0, 1], int64 mask);
* ``wids uint8``: ``wids_dataset(root, dtype="uint8")`` through a sequential sampler.

Also the decoders alone on the same JPEG bytes (Pillow vs simplejpeg, decode to an H x W x 3 array), which picks the
readers' decoder. Prints medians and the spread (min-max) over repeats, and the ratios to the baseline.

    python -m bench.bench_readers [--samples 400] [--shards 4] [--width 512] [--height 384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from bench.bench_writer import photo_like
from seediff.pipeline.index import write_index
from seediff.pipeline.plan import Plan
from seediff.pipeline.readers import raw_samples, segmentation_dataset, shard_urls, wids_dataset
from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import class_row
from seediff.workers.encode import GeneratedImage, LabelledSample, encode_sample
from seediff.workers.shards import ShardWriter


def write_dataset(out: str, samples: int, shards: int, width: int, height: int) -> None:
    config = RunConfig(output_url=out, width=width, height=height, samples_per_shard=-(-samples // shards))
    rows = (class_row("cat", 1, samples // 2, "a photograph of a cat", "", 1),
            class_row("dog", 2, samples - samples // 2, "a photograph of a dog", "", 2))
    plan = Plan(rows, config.seed, config.samples_per_shard, config.shard_layout)
    for shard_id in range(plan.num_shards):
        shard = plan.shard(shard_id)
        with ShardWriter(config, shard) as writer:
            for spec in plan.samples(shard):
                square, disc = photo_like(spec, max(width, height))
                image, labels = np.ascontiguousarray(square[:height, :width]), disc[:height, :width] * spec.class_id
                labels[:2], labels[-2:] = 255, 255
                stats = {"foreground_fraction": float((labels == spec.class_id).mean()),
                         "classes": [{"pixel_fraction": float((labels == spec.class_id).mean())}]}
                writer.add(encode_sample(LabelledSample(GeneratedImage(spec, image), labels, mask_stats=stats), config))
            writer.commit({})
    write_index(config, plan.num_shards)


def _label_map(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def plain_webdataset(root: str) -> Iterable:
    return (wds.WebDataset(shard_urls(root), shardshuffle=False, nodesplitter=wds.split_by_node)
            .decode(wds.handle_extension("mask.png", _label_map), "torchrgb8").to_tuple("jpg", "mask.png", "json"))


def rate(make: Callable[[], Iterable], workers: int, expected: int) -> float:
    """Samples/s of one full pass through a DataLoader (batch_size=None: the readers' own samples)."""
    loader = torch.utils.data.DataLoader(make(), batch_size=None, num_workers=workers)
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
    elapsed = time.perf_counter() - start
    assert count == expected, f"{count} samples, expected {expected}"
    return count / elapsed


def decode_rate(decode: Callable[[bytes], np.ndarray], images: list[bytes]) -> float:
    start = time.perf_counter()
    for data in images:
        decode(data)
    return len(images) / (time.perf_counter() - start)


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} /s (spread {min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting; the main process alike for 0 workers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as out:
        write_dataset(out, args.samples, args.shards, args.width, args.height)
        jpegs = [s["jpg"] for s in raw_samples(out)]
        import simplejpeg

        decoders = {"pillow": pillow_decode, "simplejpeg": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB")}
        assert np.array_equal(decoders["pillow"](jpegs[0]), decoders["simplejpeg"](jpegs[0]))  # the same pixels
        decoded: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(args.repeats):
            for name, decode in decoders.items():
                decoded[name].append(decode_rate(decode, jpegs))
        print(f"{args.width}x{args.height} JPEG q95 decode only, {len(jpegs)} images:")
        for name, values in decoded.items():
            print(f"  {name:12s} {summary(values)}")

        readers = {
            "webdataset uint8": lambda: plain_webdataset(out),
            "seediff uint8": lambda: segmentation_dataset(out, shuffle_shards=0, shuffle_buffer=0, dtype="uint8"),
            "seediff float32": lambda: segmentation_dataset(out, shuffle_shards=0, shuffle_buffer=0, dtype="float32"),
            "wids uint8": lambda: wids_dataset(out, dtype="uint8"),
        }
        for workers in (0, 2):
            rates: dict[str, list[float]] = {name: [] for name in readers}
            for name, make in readers.items():  # warm-up: page cache, imports
                rate(make, workers, args.samples)
            for _ in range(args.repeats):
                for name, make in readers.items():
                    rates[name].append(rate(make, workers, args.samples))
            baseline = statistics.median(rates["webdataset uint8"])
            print(f"{workers} workers, {args.samples} samples in {args.shards} shards, median of {args.repeats}:")
            for name, values in rates.items():
                print(f"  {name:17s} {summary(values)}  {statistics.median(values) / baseline:.2f}x")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at end")


if __name__ == "__main__":
    main()
