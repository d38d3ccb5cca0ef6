"""Eager vs torch.compile, plain generation vs SeeDiff masks, measured in one run (issue 14).

CPU (default): the tiny random-weight SD at 256 px, batch 2, 30 steps (the product default), inductor. Prints
masks / plain for eager and for compiled (target <= 1.10 both) and compiled / eager.
--gpu: the one-command GPU benchmark. The SD1.5-shaped random-weight UNet (bench/sd15.py, with SD's VAE and CLIP-L
text shapes), fp16, 512 px: batch 16, 8 and 32, each at 30 and 50 steps, eager and compiled, plain and masks, with
images/s and torch.cuda.max_memory_allocated; then at batch 16, compiled again with channels_last, with each SDPA
backend, and in mode reduce-overhead (CUDA graphs). Cells run in that order of priority and none starts after
--budget-s (default 400 s), which lists what was skipped: the whole run stays under 10 minutes.

"plain" is the pipeline with fused SDPA everywhere; "masks" is label_batch (capture, maps, seeded masks without
PAMR). Cells build their pipelines the way an actor does: the masks pipeline with its capture installed for good
(workers/batch.install_capture), compiled cells through workers/models.compile_model; the first call of each
compiles and is reported separately. Both pipelines stay loaded, so each peak includes both sets of weights: compare
plain and masks within a cell (the difference is what the capture adds).

    python bench/bench_compile.py [--batch-size 2] [--resolution 256] [--steps 30] [--repeats 3] [--threads N]
    python bench/bench_compile.py --gpu
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_mask_overhead import bench_specs, sd15_pipeline, timed, with_refine  # noqa: E402
from seediff.schemas.config import RunConfig  # noqa: E402
from seediff.workers.batch import install_capture, label_batch  # noqa: E402
from seediff.workers.generate import GENERATION, diffusion_inputs  # noqa: E402
from seediff.workers.models import TINY_MODEL, compile_model, load_model  # noqa: E402

GPU_BATCHES = (16, 8, 32)  # priority order: the batch of the H100 reference figures first
GPU_STEPS = (30, 50)
# Re-measured under compile at batch 16, after the main grid: name -> (memory format, SDPA backend, compile mode)
PLAIN_OPTIONS = (None, None, "default")
GPU_VARIANTS = {
    "compiled channels_last": ("channels_last", None, "default"),
    "compiled sdpa=flash": (None, "FLASH_ATTENTION", "default"),
    "compiled sdpa=efficient": (None, "EFFICIENT_ATTENTION", "default"),
    "compiled sdpa=cudnn": (None, "CUDNN_ATTENTION", "default"),
    "compiled reduce-overhead": (None, None, "reduce-overhead"),
}


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    steps_list = GPU_STEPS if args.gpu else (args.steps,)
    cells = [(b, v) for b in GPU_BATCHES for v in ("eager", "compiled")] if args.gpu else [
        (args.batch_size, "eager"), (args.batch_size, "compiled")]
    if args.gpu:
        cells += [(16, v) for v in GPU_VARIANTS]
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{'SD1.5-shaped' if args.gpu else 'tiny'} random-weight model, {where}, torch {torch.__version__}, "
          f"{'float16, 512' if args.gpu else f'float32, {args.resolution}'} px, CFG 7.5, median of {args.repeats}")
    started = time.perf_counter()
    results: dict[tuple[int, int, str, str], tuple[float, int]] = {}
    for batch, variant in cells:
        if time.perf_counter() - started > args.budget_s:
            print(f"  skipped (budget {args.budget_s:.0f} s spent): batch {batch}, {variant}")
            continue
        memory_format, backend, mode = GPU_VARIANTS.get(variant, PLAIN_OPTIONS)
        config = RunConfig(model=TINY_MODEL, resolution=512 if args.gpu else args.resolution, steps=max(steps_list),
                           guidance_scale=7.5, batch_size=batch, dtype="float16" if args.gpu else "float32",
                           compile=variant != "eager", compile_mode=mode)
        try:  # one cell failing (an SDPA backend without a kernel for these head dims, OOM) must not end the run
            with ExitStack() as cell:
                cell.enter_context(sdpa_backend(backend))
                modes, compile_s = prepare(config, device, memory_format)
                print(f"  batch {batch:3d} {variant:26s} ready; first calls (compile) {compile_s:7.1f} s", flush=True)
                for steps in steps_list:
                    specs, run_config = bench_specs(config, batch), config.model_copy(update={"steps": steps})
                    times: dict[str, list[float]] = {name: [] for name in modes}
                    peaks: dict[str, int] = {}
                    for _ in range(args.repeats):  # interleaved, so drift affects both modes alike
                        for name, run in modes.items():
                            seconds, peak = timed(lambda: run(specs, run_config), device)
                            times[name].append(seconds)
                            peaks[name] = max(peaks.get(name, 0), peak)
                    for name in modes:
                        results[batch, steps, variant, name] = statistics.median(times[name]), peaks[name]
                del modes
        except Exception as e:  # noqa: BLE001 -- reported, and the next cell runs
            print(f"  batch {batch:3d} {variant:26s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        release(device)
    report(results, device)
    print(f"total {time.perf_counter() - started:.0f} s")


def prepare(config: RunConfig, device: torch.device, memory_format: str | None) -> tuple[dict[str, Callable], float]:
    """The plain and masks runs of one cell, each warmed up by one call; returns them and the seconds the warm-up
    calls took (compilation, for compiled cells)."""
    masks_config = with_refine(config, "none")

    def build():
        pipe = sd15_pipeline(device, config) if device.type == "cuda" else load_model(config, device)
        if memory_format == "channels_last":
            pipe.unet.to(memory_format=torch.channels_last)
        return pipe

    plain_pipe, masks_pipe = build(), build()
    if config.compile:
        compile_model(plain_pipe, config.compile_mode)
    started = time.perf_counter()
    capture, _ = install_capture(masks_pipe, masks_config, GENERATION)  # as an actor does: installed for good
    modes = {
        "plain": lambda specs, cfg: plain_pipe(**diffusion_inputs(plain_pipe, specs, cfg), output_type="pt"),
        "masks": lambda specs, cfg: label_batch(masks_pipe, specs, with_refine(cfg, "none"), GENERATION, capture),
    }
    warm_up = config.model_copy(update={"steps": 1})
    for run in modes.values():
        run(bench_specs(config, config.batch_size), warm_up)
    return modes, time.perf_counter() - started


def sdpa_backend(name: str | None):
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def release(device: torch.device) -> None:
    torch._dynamo.reset()  # drop compiled code and the guards that hold the pipelines
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(results: dict, device: torch.device) -> None:
    gpu = device.type == "cuda"
    print(f"  {'batch':>5s} {'steps':>5s} {'variant':26s} {'plain s':>8s} {'masks s':>8s} {'masks/plain':>11s} "
          f"{'plain img/s':>11s} {'masks img/s':>11s}" + (f" {'peak plain / masks GiB':>23s}" if gpu else ""))
    cells = sorted({k[:3] for k in results if all((*k[:3], m) in results for m in ("plain", "masks"))})
    for batch, steps, variant in cells:
        (plain, plain_peak), (masks, masks_peak) = (results[batch, steps, variant, m] for m in ("plain", "masks"))
        memory = f" {plain_peak / 2**30:11.2f} / {masks_peak / 2**30:5.2f}" if gpu else ""
        print(f"  {batch:5d} {steps:5d} {variant:26s} {plain:8.3f} {masks:8.3f} {masks / plain:10.3f}x "
              f"{batch / plain:11.2f} {batch / masks:11.2f}{memory}")
    for batch, steps, variant in cells:
        if variant == "compiled" and (batch, steps, "eager") in {c for c in cells}:
            eager = {m: results[batch, steps, "eager", m][0] for m in ("plain", "masks")}
            ratios = {m: results[batch, steps, "compiled", m][0] / eager[m] for m in eager}
            print(f"  batch {batch} {steps} steps: compiled / eager: plain {ratios['plain']:.3f}x, "
                  f"masks {ratios['masks']:.3f}x")
    for batch, steps, variant in cells:
        if variant in ("eager", "compiled"):
            ratio = results[batch, steps, variant, "masks"][0] / results[batch, steps, variant, "plain"][0]
            print(f"  ratio masks / plain, {variant}, batch {batch}, {steps} steps = {ratio:.3f} (target <= 1.10)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the SD1.5-shaped grid on a CUDA GPU")
    parser.add_argument("--batch-size", type=int, default=2, help="CPU only")
    parser.add_argument("--resolution", type=int, default=256, help="CPU only")
    parser.add_argument("--threads", type=int, default=None, help="CPU only: torch threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=RunConfig().steps, help="CPU only (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on the CPU, 2 on a GPU")
    # a cell takes up to ~3 minutes on an H100 (two compiles and the runs), hence 400 s for a 10-minute script
    parser.add_argument("--budget-s", type=float, default=400, help="start no cell after this many seconds")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.gpu else 3)
    return args


if __name__ == "__main__":
    main()
