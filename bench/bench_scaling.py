"""Images/s of the whole generate path (Ray dispatch, tiny model, masks, encode, shard writes) with 1 and then 2 CPU
actors on this machine, same manifest and shard plan, each on a fresh local Ray session and a fresh output; prints
the ratio. Enough work per image to matter (128 px, 10 steps by default). Run: python bench/bench_scaling.py"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seediff.pipeline.run import run_generation  # noqa: E402
from seediff.schemas.config import MaskConfig, RunConfig, RuntimeOptions  # noqa: E402
from seediff.schemas.manifest import load_manifest  # noqa: E402


def images_per_s(manifest_path: Path, config: RunConfig, actors: int) -> tuple[float, dict[str, float]]:
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        summary = run_generation(load_manifest(manifest_path), config, RuntimeOptions(num_actors=actors, device="cpu"))
    finally:
        ray.shutdown()
    assert summary.ok, summary.failed_shards
    # Wall time of dispatch includes actor start-up (model load); report both views.
    return summary.images_per_s, {actor: rate.images_per_s for actor, rate in summary.actors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32, help="samples in total (two classes)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples-per-shard", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        half = args.samples // 2
        manifest.write_text(f"class_name,num_samples\ncat,{half}\ndog,{args.samples - half}\n")
        rates, busy_rates = {}, {}
        for actors in (1, 2):
            config = RunConfig(
                model="tiny", resolution=args.resolution, steps=args.steps, batch_size=2,
                samples_per_shard=args.samples_per_shard, mask=MaskConfig(pamr_iterations=10),
                output_url=str(Path(tmp) / f"out-{actors}"),
            )
            rates[actors], per_actor = images_per_s(manifest, config, actors)
            busy_rates[actors] = sum(per_actor.values())
            busy = ", ".join(f"{v:.2f}" for v in per_actor.values())
            print(f"{actors} actor(s): {rates[actors]:.2f} img/s wall (incl. start-up); per actor busy: {busy} img/s")
        print(f"cpus={os.cpu_count()} samples={args.samples} {args.resolution}px {args.steps} steps: 2 actors / 1 actor = "
              f"{rates[2] / rates[1]:.2f}x wall, {busy_rates[2] / busy_rates[1]:.2f}x summed busy rate")


if __name__ == "__main__":
    main()
