"""Benchmark the driver's own cost: 10^4 and 10^5 shards dispatched to no-op actors on a local Ray cluster (the
real Dispatcher and actor pool, shards as id ranges), each size in a fresh process; plus the dry run of a 10^8-sample
manifest at 1000 and at 1 sample per shard (10^8 planned shards). Prints the driver's peak RSS, CPU seconds per
shard and wall time, the 10^5 / 10^4 ratios, and the dry run's bytes per planned shard.

Run: python bench/bench_driver.py [--shards 10000 100000] [--actors 2] [--in-flight 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class NoOpActor:
    """Takes the ShardActor's constructor arguments and returns a stats-sized dict at once: only dispatch costs."""

    def __init__(self, config, runtime, plan, **kwargs):
        self.plan = plan

    def generate_shard(self, shard, attempt):
        return {"shard_id": shard.shard_id, "count": len(shard), "attempt": attempt, "host": "bench"}


def one_size(num_shards: int, actors: int, in_flight: int) -> dict:
    import ray

    from seediff.pipeline.dispatch import Dispatcher, shard_actor_pool
    from seediff.pipeline.plan import Plan
    from seediff.schemas.config import RunConfig, RuntimeOptions
    from seediff.schemas.manifest import class_row

    samples_per_shard = 1000
    rows = [class_row(f"class{i}", i + 1, num_shards * samples_per_shard // 100, f"a photo of class{i}", "", i + 2)
            for i in range(100)]
    plan = Plan(rows, 0, samples_per_shard)
    runtime = RuntimeOptions(device="cpu", num_actors=actors, shards_in_flight_per_actor=in_flight,
                             shard_timeout_s=600)
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    try:
        pool = shard_actor_pool(NoOpActor, RunConfig(model="tiny"), plan, runtime, against_cluster=False)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        todo = [plan.shard(i) for i in range(plan.num_shards)]
        result = Dispatcher(todo, pool.make_actor, pool.size, runtime).run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        ray.shutdown()
    assert len(result.completed) == plan.num_shards
    return {
        "shards": plan.num_shards,
        "samples": plan.num_samples,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_ms_per_shard": 1000 * cpu / plan.num_shards,
        "wall_s": wall,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's size carried across exec)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def dry_run_peak_mb(samples_per_shard: int) -> float:
    """Peak RSS of ``generate --dry-run`` on 10^8 samples (100 classes) at ``samples_per_shard``."""
    shards = 10**8 // samples_per_shard
    digits = max(6, len(str(shards - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "big.csv"
        manifest.write_text("class_name,num_samples\n" + "".join(f"class{i},{10**6}\n" for i in range(100)))
        args = ["generate", str(manifest), "--out", tmp + "/out", "--model", "tiny", "--dry-run",
                "--samples-per-shard", str(samples_per_shard), "--shard-digits", str(digits)]
        probe = (
            f"import sys; from seediff.pipeline.cli import main; rc = main({args!r}); "
            "print('PEAK_KB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
        )
        done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return int(done.stdout.split("PEAK_KB")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[10**4, 10**5])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.actors, args.in_flight)))
        return
    results = []
    for n in args.shards:  # each size in a fresh process: peak RSS is per process
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--actors", str(args.actors), "--in-flight", str(args.in_flight)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"no-op actors: {args.actors}, shards in flight per actor: {args.in_flight}, local Ray")
    for r in results:
        print(f"  {r['shards']:>7} shards ({r['samples']:.0e} samples): driver peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"driver CPU {r['cpu_ms_per_shard']:.2f} ms/shard, wall {r['wall_s']:.0f} s "
              f"({r['shards'] / r['wall_s']:.0f} shards/s)")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(f"  ratios {large['shards']}/{small['shards']} shards: peak RSS x{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}, "
              f"CPU per shard x{large['cpu_ms_per_shard'] / small['cpu_ms_per_shard']:.2f}")
    coarse, fine = dry_run_peak_mb(1000), dry_run_peak_mb(1)
    print(f"dry run of 10^8 samples (100 classes): peak RSS {coarse:.0f} MB at 1000 samples per shard (10^5 shards), "
          f"{fine:.0f} MB at 1 sample per shard (10^8 shards): "
          f"{(fine - coarse) * 2**20 / (10**8 - 10**5):.1f} bytes per planned shard")


if __name__ == "__main__":
    main()
