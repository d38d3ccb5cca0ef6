"""Cost of SeeDiff masks on top of plain generation, measured in one run with the same batch, steps and seeds.

Modes (each timed end to end, latents to decoded images):
  plain      the pipeline with fused SDPA everywhere
  capture    + capture processors on SeeDiff's layers (running sums), maps averaged
  masks      + seeded masks without PAMR (label_batch with refine='none')
  pamr       + PAMR boundary refinement (label_batch with refine='pamr')
Run: python bench/bench_mask_overhead.py [--sd15] [--batch-size N] [--steps N]
--steps defaults to the product default, RunConfig().steps (30): capture costs the same fraction of every UNet call,
but the mask algorithm is a fixed cost per image, so fewer steps than a real run overstate its share.
Prints median seconds per batch, peak CUDA memory on a GPU, and (plain + capture + masks) / plain. Target <= 1.10.

CPU (default): the tiny random-weight SD (attention at latent, latent/2, latent/4) at 256 px.
--sd15: a random-weight UNet with SD1.5's config (bench/sd15.py; plus SD's VAE and CLIP ViT-L text encoder shapes), fp16 on CUDA,
512 px. No download: configs are hard-coded, weights random.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sd15 import SD15_UNET  # noqa: E402
from seediff.schemas.config import MaskConfig, RunConfig  # noqa: E402
from seediff.schemas.manifest import class_row  # noqa: E402
from seediff.schemas.records import SampleSpec  # noqa: E402
from seediff.workers.batch import label_batch  # noqa: E402
from seediff.workers.generate import GENERATION, diffusion_inputs  # noqa: E402
from seediff.workers.models import TINY_MODEL, build_tiny_model, load_model, resolve_dtype  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
# CLIP ViT-L/14's text tower (SD1.x's text encoder); the context length stays TINY_TEXT's 77.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
CLASSES = ["dog", "potted plant", "cat", "aeroplane", "bicycle", "tvmonitor", "horse", "sheep"]


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if args.sd15 else "cpu")
    config = RunConfig(
        model=TINY_MODEL,
        resolution=args.resolution or (512 if args.sd15 else 256),
        steps=args.steps,
        guidance_scale=7.5,
        batch_size=args.batch_size,
        dtype="float16" if args.sd15 else "float32",
        mask=MaskConfig(pamr_iterations=args.pamr_iterations),
    )
    pipe = sd15_pipeline(device, config) if args.sd15 else load_model(config, device)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    specs = bench_specs(config, args.batch_size)
    modes = {
        "plain": lambda: pipe(**diffusion_inputs(pipe, specs, config), output_type="pt"),
        "capture": lambda: GENERATION.run(pipe, specs, config, None),
        "masks": lambda: label_batch(pipe, specs, with_refine(config, "none"), GENERATION),
        "pamr": lambda: label_batch(pipe, specs, with_refine(config, "pamr"), GENERATION),
    }
    for run in modes.values():  # warm-up: kernels, allocator, lazy init
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    peaks: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved so drift affects every mode alike
        for name, run in modes.items():
            seconds, peak = timed(run, device)
            times[name].append(seconds)
            peaks[name] = max(peaks.get(name, 0), peak)
    report(args, config, device, times, peaks)


def bench_specs(config: RunConfig, batch_size: int) -> list[SampleSpec]:
    """One sample per class in CLASSES (cycled), fixed seeds, so every mode generates the same batch."""
    return [
        SampleSpec(i, i, 0, 1000 + i, class_row(c, i + 1, 1, config.prompt_template, "", i + 1))
        for i, c in enumerate(CLASSES[i % len(CLASSES)] for i in range(batch_size))
    ]


def with_refine(config: RunConfig, refine: str) -> RunConfig:
    return config.model_copy(update={"mask": config.mask.model_copy(update={"refine": refine})})


def sd15_pipeline(device: torch.device, config: RunConfig):
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("--sd15 needs a CUDA GPU")
    with torch.device(device):  # initialise the 860M-parameter UNet directly on the GPU
        pipe = build_tiny_model(unet_overrides=SD15_UNET, text_overrides=CLIP_L_TEXT, vae_overrides=SD_VAE)
    pipe = pipe.to(device=device, dtype=resolve_dtype(config.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def report(args, config, device, times, peaks) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{'SD1.5-shaped' if args.sd15 else 'tiny'} random-weight UNet, {where}, {config.dtype}, "
        f"{config.resolution}px, batch {args.batch_size}, {args.steps} steps, CFG {config.guidance_scale}, "
        f"PAMR {args.pamr_iterations} iterations, median of {args.repeats}"
        f"{', channels_last' if args.channels_last else ''}"
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        memory = f"  peak {peaks[name] / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"  {name:8s} {seconds:8.3f} s/batch  {seconds / args.batch_size:8.4f} s/image  "
              f"x{seconds / median['plain']:.3f}{memory}")
    print(f"ratio (generation + capture + masks) / (plain generation) = {median['masks'] / median['plain']:.3f} "
          f"(target <= 1.10); with PAMR = {median['pamr'] / median['plain']:.3f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="SD1.5-shaped random UNet, fp16 on CUDA, 512 px")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=RunConfig().steps, help="default: RunConfig's (%(default)s)")
    parser.add_argument("--resolution", type=int, default=None, help="default 256 (CPU) / 512 (--sd15)")
    parser.add_argument("--pamr-iterations", type=int, default=MaskConfig().pamr_iterations)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="UNet weights and activations in NHWC")
    return parser.parse_args()


if __name__ == "__main__":
    main()
