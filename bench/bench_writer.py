"""Shard writer throughput on local disk: 512x512 JPEG q95 + mask PNG per sample.

Prints samples/s for encode only (image + mask + metadata), write only (tar + parquet + stats from pre-encoded
samples) and both together, each measured in this one run on this machine.

    python -m bench.bench_writer [--samples 256] [--resolution 512] [--quality 95]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable

import numpy as np

from seediff.pipeline.plan import Plan
from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import class_row
from seediff.schemas.records import SampleOutcome, SampleSpec, ShardSpec
from seediff.workers.encode import GeneratedImage, LabelledSample, encode_sample
from seediff.workers.shards import ShardWriter


def photo_like(spec: SampleSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth gradients with mild noise (JPEG sizes near a generated photo's, unlike pure noise) and an ellipse."""
    rng = np.random.default_rng(spec.seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [128 + 90 * np.sin(6 * x + 4 * y + p) * np.cos(3 * y - p) for p in phase]
    image = np.stack(channels, axis=-1) + rng.normal(0, 6, (size, size, 3))
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    mask = (y - cy) ** 2 + (x - cx) ** 2 < r**2
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)  # label map of class 1


def labelled_sample(spec: SampleSpec, image: np.ndarray, labels: np.ndarray, stats: dict) -> LabelledSample:
    return LabelledSample(GeneratedImage(spec, image), labels, mask_stats=stats)


def write_shard(config: RunConfig, shard: ShardSpec, outcomes: Iterable[SampleOutcome]) -> dict:
    with ShardWriter(config, shard) as writer:
        for outcome in outcomes:
            writer.add(outcome)
        return writer.commit({})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-writer-") as out:
        config = RunConfig(
            output_url=out, resolution=args.resolution, image_quality=args.quality, samples_per_shard=args.samples
        )
        rows = (class_row("cat", 1, args.samples, "a photograph of a cat", "", 1),)
        plan = Plan(rows, config.seed, config.samples_per_shard)
        shard, samples = plan.shard(0), plan.samples(plan.shard(0))
        arrays = [photo_like(spec, args.resolution) for spec in samples]
        stats = {"foreground_fraction": 0.2, "num_seeds": 3}

        # Warm-up on a one-sample shard: one-off lazy imports (pyarrow pulls in pandas) are not throughput.
        first = samples[0]
        write_shard(config, ShardSpec(0, 0, 1), [encode_sample(labelled_sample(first, *arrays[0], stats), config)])
        t0 = time.perf_counter()
        outcomes = [encode_sample(labelled_sample(s, img, m, stats), config) for s, (img, m) in zip(samples, arrays)]
        t1 = time.perf_counter()
        written = write_shard(config, shard, outcomes)
        t2 = time.perf_counter()
        encoded = (encode_sample(labelled_sample(s, img, m, stats), config) for s, (img, m) in zip(samples, arrays))
        write_shard(config, shard, encoded)  # encodes lazily, sample by sample, as the actor does
        t3 = time.perf_counter()

    n = args.samples
    image_kb = np.mean([len(o.image) for o in outcomes]) / 1024
    mask_kb = np.mean([len(o.mask) for o in outcomes]) / 1024
    print(f"{n} samples, {args.resolution}x{args.resolution} JPEG q{args.quality} + mask PNG, local disk")
    tar_kb = written["tar_bytes"] / n / 1024
    print(f"mean bytes/sample: image {image_kb:.1f} KiB, mask {mask_kb:.2f} KiB, tar {tar_kb:.1f} KiB")
    print(f"encode only   : {n / (t1 - t0):8.1f} samples/s")
    print(f"write only    : {n / (t2 - t1):8.1f} samples/s  (tar + parquet + stats, pre-encoded)")
    print(f"encode + write: {n / (t3 - t2):8.1f} samples/s")
    print(f"write-only throughput / encode-only throughput: {(t1 - t0) / (t2 - t1):.1f}x")


if __name__ == "__main__":
    main()
