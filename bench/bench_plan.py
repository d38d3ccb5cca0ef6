"""Benchmark the lazy plan: build time and memory for 10^6 and 10^8 samples over 1000 classes, and the cost of
10^5 random shard-range and sample lookups. Prints the numbers and the 10^8 / 10^6 ratios, which stay near 1
because the plan's state and lookup cost grow with the number of classes, not samples.

Run: python bench/bench_plan.py
"""

from __future__ import annotations

import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seediff.pipeline.plan import Plan  # noqa: E402
from seediff.schemas.manifest import class_row  # noqa: E402

CLASSES = 1000
LOOKUPS = 10**5
SAMPLES_PER_SHARD = 1000


def measure(total_samples: int) -> dict[str, float]:
    per_class = total_samples // CLASSES
    rows = [class_row(f"class{i}", i % 254 + 1, per_class, f"a photo of class{i}", "", i + 2) for i in range(CLASSES)]

    start = time.perf_counter()
    plan = Plan(rows, 0, SAMPLES_PER_SHARD)
    build_s = time.perf_counter() - start
    tracemalloc.start()  # a second build, traced separately so tracing does not inflate the timing
    traced = Plan(rows, 0, SAMPLES_PER_SHARD)  # bound to a name so it is still alive when memory is read
    plan_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del traced

    rng = random.Random(0)
    shard_ids = [rng.randrange(plan.num_shards) for _ in range(LOOKUPS)]
    sample_ids = [rng.randrange(plan.num_samples) for _ in range(LOOKUPS)]
    start = time.perf_counter()
    for shard_id in shard_ids:
        plan.shard_range(shard_id)
    shard_s = time.perf_counter() - start
    start = time.perf_counter()
    for sample_id in sample_ids:
        plan.sample(sample_id)
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    plan.shard(plan.num_shards // 2)
    full_shard_s = time.perf_counter() - start
    return {"build_s": build_s, "plan_bytes": plan_bytes, "shard_s": shard_s, "sample_s": sample_s,
            "full_shard_s": full_shard_s}


def main() -> None:
    results = {n: measure(n) for n in (10**6, 10**8)}
    print(f"{CLASSES} classes, {SAMPLES_PER_SHARD} samples per shard, {LOOKUPS} random lookups each")
    for n, r in results.items():
        print(
            f"{n:>11,} samples: build {r['build_s'] * 1e3:7.3f} ms ({r['plan_bytes'] / 1024:6.1f} KiB traced) | "
            f"{LOOKUPS} shard_range {r['shard_s'] * 1e3:7.1f} ms ({r['shard_s'] / LOOKUPS * 1e6:.2f} us each) | "
            f"{LOOKUPS} sample {r['sample_s'] * 1e3:7.1f} ms ({r['sample_s'] / LOOKUPS * 1e6:.2f} us each) | "
            f"one full {SAMPLES_PER_SHARD}-sample shard {r['full_shard_s'] * 1e3:.2f} ms"
        )
    small, large = results[10**6], results[10**8]
    print(
        "ratio 10^8 / 10^6: "
        + ", ".join(f"{k} {large[k] / small[k]:.2f}x" for k in ("build_s", "plan_bytes", "shard_s", "sample_s"))
    )


if __name__ == "__main__":
    main()
