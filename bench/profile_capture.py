"""Where capture time goes on a GPU: torch.profiler over one SD1.5-shaped fp16 generation with and without capture.

Run on a CUDA machine: python bench/profile_capture.py [--batch-size 8] [--steps 5]
Prints the wall time of each mode (plain, capture, capture + masks without PAMR), the top CUDA kernels of each, and
the top CPU ops of the masks run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_mask_overhead import bench_specs, sd15_pipeline, with_refine  # noqa: E402
from seediff.schemas.config import RunConfig  # noqa: E402
from seediff.workers.batch import label_batch  # noqa: E402
from seediff.workers.generate import GENERATION, diffusion_inputs  # noqa: E402
from seediff.workers.models import TINY_MODEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    config = RunConfig(model=TINY_MODEL, resolution=512, steps=args.steps, batch_size=args.batch_size, dtype="float16")
    pipe = sd15_pipeline(device, config)
    specs = bench_specs(config, args.batch_size)
    modes = {
        "plain": lambda: pipe(**diffusion_inputs(pipe, specs, config), output_type="pt"),
        "capture": lambda: GENERATION.run(pipe, specs, config, None),
        "masks": lambda: label_batch(pipe, specs, with_refine(config, "none"), GENERATION),
    }
    for name, run in modes.items():
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - start:.3f} s")
    for name, run in modes.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(f"--- {name}: top CUDA time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print("--- masks: top CPU time")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
