"""Memory per image of SeeDiff capture against the official code's store-all approach (issue 5; target: capture
<= 80 MB per image at SD1.5 512², constant in the number of steps; store-all ~10 GiB).

1. Computed from shapes, SD1.5 at 512²: the UNet is built on the meta device and workers/capture.py locates its
   attention layers and plans SeeDiff's, so the shapes come from the real module structure.
2. Measured on CPU: a small random UNet with three attention scales, SD1.5's 8 heads and small channels, at latent
   32 (--latent 64 gives the captured maps exactly SD1.5's shapes); a DDIM loop with guidance, with and without
   capture.
3. --cuda: the SD1.5 UNet in fp16 with random weights on the GPU, the same loop, torch.cuda.max_memory_allocated.
5. Computed from shapes per MM-DiT (Flux.1-dev/schnell, SD3-medium, SD3.5-large; their published transformer
   shapes): the cascade on one token grid of bench_mmdit_cascade.py, one self sum at its finest side, the coarser
   sides pooled from it, cross sums pooled to the seed side; against SD1.5 512² (issue 18 target: <= 1.5x).
4. Computed from shapes per model family (SD1.5, SD2-base, SD2.1-768, SDXL; square and non-square sizes): each
   family's UNet on the meta device, its layer choice (workers/families.py) and the default cap on self-attention
   entries (mask.max_self_entries): accumulators per image against SD1.5 512² (issue 11 target: <= 1.5x for every
   family), and without the cap.

    python -m bench.bench_memory [--batch 2] [--steps 2 20] [--latent 32] [--query-chunk 1024]
    python -m bench.bench_memory --cuda --batch 8 [--steps 2 5]
    python -m bench.bench_memory --computed-only

How peak memory is measured. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the bytes
allocated at the start (weights, inputs). CPU: torch's CPU allocator reports every allocation and free with its
size to the profiler (profile_memory=True, the "[memory]" events); the running sum of those sizes is the bytes of
live tensors, and its maximum over the run is the peak above the start -- the CPU analogue of
max_memory_allocated. Process RSS would add allocator caching and the Python heap, and tracemalloc sees no torch
storage, so neither is used.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from bench.sd15 import FAMILY_UNETS, SD15_LATENT, SD15_TEXT_DIM, SD15_TEXT_TOKENS, build_sd15_unet, build_unet
from seediff.schemas.config import MaskConfig
from seediff.workers.capture import (
    AttentionLayer,
    SeeDiffCapture,
    key_pool,
    locate_attention_layers,
    plan_seediff_layers,
)
from seediff.workers.families import TINY_UNET, default_layers

TARGET_BYTES = 80e6  # issue 5: capture memory per image at SD1.5 512²
FAMILY_TARGET = 1.5  # issue 11: every family's capture memory per image within 1.5x of SD1.5's at 512²
# (family, width, height): native squares, and 2:3 / 16:9 sizes in each family's size unit (64 px; SDXL 32 px)
FAMILY_SIZES = [
    ("SD1.5", 512, 512), ("SD1.5", 512, 768), ("SD1.5", 1024, 576), ("SD2-base", 512, 512),
    ("SD2.1-768", 768, 768), ("SD2.1-768", 1024, 576), ("SDXL", 1024, 1024), ("SDXL", 832, 1216),
    ("SDXL", 1024, 576), ("SDXL", 1344, 768),
]
OFFICIAL_CALLS = 51  # the official code: PNDM with 50 steps repeats one timestep, 51 UNet calls
CLASS_TOKEN = [2]  # a one-token class word (the cross sums keep every text token: the count costs nothing)
FP32 = 4

# The tiny test UNet widened to SD1.5's 8 heads; with --latent 64 the captured layers have exactly SD1.5's shapes
# (about 5 s per UNet call on 2 cores), the default latent 32 (256 px) keeps the CPU run near a minute.
SMALL_UNET = {**TINY_UNET, "block_out_channels": (32, 32, 64, 64), "attention_head_dim": 8}


def fmt(n: float) -> str:
    return f"{n / 1e6:9.2f} MB ({n / 2**20:9.2f} MiB)"


def fmt_gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


# ---------------------------------------------------------------- 1. computed from shapes


def fine_self_transient(unet: UNet2DConditionModel, latent: int, query_chunk: int | None) -> dict[str, int]:
    """Peak extra bytes per image while workers/capture.py captures the fine (latent-side) self-attention layer,
    counted from its code. Chunked torch path (CPU; CUDA without Triton), ``query_chunk`` rows at a time: the
    conditional half's queries and keys, one chunk's scores in the model dtype, their fp32 softmax, and the fp32
    head-summed blocks (two while chunking: the consumer still holds the previous one while the next is computed).
    Fused Triton path (CUDA, ``query_chunk`` None): queries, keys and the per-head row log-sum-exp in fp32."""
    layer = plan_seediff_layers(locate_attention_layers(unet, latent), latent).self_attn[-1]
    inner_dim = unet.get_submodule(layer.key.removesuffix(".processor")).inner_dim
    dtype_bytes = unet.dtype.itemsize
    n, heads = layer.tokens, layer.heads
    queries_keys = {"queries + keys": 2 * n * inner_dim * dtype_bytes}
    if query_chunk is None:
        return {"row log-sum-exp (heads x queries, fp32)": heads * n * FP32, **queries_keys}
    rows = min(query_chunk, n)
    return {
        "scores (rows x keys x heads x dtype)": rows * n * heads * dtype_bytes,
        "fp32 softmax of the chunk": rows * n * heads * FP32,
        "head-summed fp32 blocks (1 or 2)": (1 if rows == n else 2) * rows * n * FP32,
        **queries_keys,
    }


def store_all_bytes_per_call(layers: list[AttentionLayer], text_tokens: int) -> int:
    """Every layer's map, all heads, conditional half, fp32, one UNet call (what the official AttentionStore adds)."""
    return FP32 * sum(l.heads * l.tokens * (l.tokens if l.kind == "self" else text_tokens) for l in layers)


def computed_sd15(query_chunk: int) -> None:
    unet = build_sd15_unet("meta")
    layers = locate_attention_layers(unet, SD15_LATENT)
    kinds = {k: sum(l.kind == k for l in layers) for k in ("self", "cross")}
    print(f"== 1. computed from shapes: SD1.5 UNet on the meta device, latent {SD15_LATENT}, "
          f"{kinds['self']} self + {kinds['cross']} cross layers, heads {sorted({l.heads for l in layers})}")

    capture = SeeDiffCapture(unet, SD15_LATENT, 1, query_chunk=query_chunk)  # meta: nothing allocated
    print("accumulators per image (fp32, head-summed, running sums; shapes from the capture module's buffers):")
    for scale, layer, processor in zip(("coarse", "middle", "fine"), capture.plan.self_attn, capture.self_attn):
        buffer = processor.sum
        print(f"  self {scale:6s} {layer.grid[0]:2d}²  {tuple(buffer.shape)!s:22s} {fmt(buffer.nbytes)}  {layer.key}")
    cross_bytes = sum(p.sum.nbytes for p in capture.cross)
    print(f"  cross x{len(capture.cross)} at {capture.plan.cross[0].grid[0]}², all {SD15_TEXT_TOKENS} text tokens"
          f"{'':2s} {fmt(cross_bytes)}")
    ours = capture.buffer_bytes()
    print(f"  total                                {fmt(ours)}   target <= {TARGET_BYTES / 1e6:.0f} MB: "
          f"{'met' if ours <= TARGET_BYTES else 'MISSED'}")

    fine = capture.plan.self_attn[-1]
    fp16_unet = unet.to(torch.float16)  # meta: only the dtype changes
    print(f"peak transient of the captured fine self layer ({fine.grid[0]}², {fine.tokens} keys, {fine.heads} heads), "
          "per image, fp16 model, chunked torch path (CPU; CUDA without Triton):")
    for chunk in sorted({256, 512, 1024, 4096, query_chunk}):
        parts = fine_self_transient(fp16_unet, SD15_LATENT, chunk)
        scores, transient = next(iter(parts.values())), sum(parts.values())
        mark = "  <- configured query_chunk" if chunk == query_chunk else ""
        print(f"  query_chunk {chunk:5d}: scores {fmt(scores)}, all parts {fmt(transient)}"
              f"; accumulators + transient {fmt(ours + transient)}{mark}")
    for name, size in fine_self_transient(fp16_unet, SD15_LATENT, query_chunk).items():
        print(f"    {name:38s} {fmt(size)}")
    fused = sum(fine_self_transient(fp16_unet, SD15_LATENT, None).values())
    print(f"  fused Triton path (CUDA): queries, keys and row log-sum-exp only  {fmt(fused)}")
    print("  a transient raises the peak only where it exceeds the UNet's own activation peak (measured below)")

    per_call = store_all_bytes_per_call(layers, SD15_TEXT_TOKENS)
    print("store-all baseline (official SeeDiff code: explicit softmax on all 32 layers, AttentionStore keeps them):")
    print(f"  M = one UNet call, every layer, all heads, conditional half, fp32                {fmt_gib(per_call)}")
    print("  stored maps are views attn[h//2:] of the [uncond, cond] softmax, so each keeps 2x its size alive:")
    print(f"    running sum = the first call's views, added to in place                   2M = {fmt_gib(2 * per_call)}")
    print(f"    this call's step store, until between_steps folds it in                   2M = {fmt_gib(2 * per_call)}")
    print(f"    held at the end of every UNet call                                        4M = {fmt_gib(4 * per_call)}"
          "  (the notes' '~10 GiB or more')")
    explicit_64 = 2 * 2 * fine.heads * fine.tokens**2 * FP32  # scores and softmax, [2 * heads, 4096, 4096] fp32 each
    print(f"    + while a 64² layer runs: its scores and softmax, both CFG halves          {fmt_gib(explicit_64)}")
    print(f"  ratio store-all (4M) / ours: {4 * per_call / ours:.0f}x")
    print("constant in steps? per image, by number of UNet calls:")
    for calls in (2, 20, OFFICIAL_CALLS):
        print(f"  {calls:3d} calls: ours {fmt(ours)} | store-all running {fmt_gib(4 * per_call)} "
              f"| kept per step (calls x M) {fmt_gib(calls * per_call)}")


def computed_families(query_chunk: int) -> None:
    cap = MaskConfig().max_self_entries
    print(f"\n== 4. computed from shapes per family: accumulators per image (fp32), default cap {cap} = 4096² entries "
          "per self sum; ratio against SD1.5 512²")
    print("| family | size (w x h) | sides, coarse -> fine (key pool) | cross layers | accumulators | vs SD1.5 | "
          "without the cap | fine-layer transient, chunked path |")
    print("|---|---|---|---|---|---|---|---|")
    unets, reference = {}, None
    for family, width, height in FAMILY_SIZES:
        config, _ = FAMILY_UNETS[family]
        unet = unets.setdefault(family, build_unet(config).to(torch.float16))  # meta: nothing allocated
        latent = (height // 8, width // 8)
        layers = default_layers(config)
        capped, uncapped = (SeeDiffCapture(unet, latent, 1, layers=layers, max_self_entries=c, path="explicit",
                                           query_chunk=query_chunk) for c in (cap, None))
        ours = capped.buffer_bytes()
        reference = reference or ours
        sides = " → ".join(f"{l.grid[1]}x{l.grid[0]}" + (f" (f={f})" if f > 1 else "")
                           for l, f in zip(capped.plan.self_attn, capped.plan.key_pool))
        fine = capped.self_attn[-1]
        chunk = min(query_chunk, capped.plan.self_attn[-1].tokens)
        transient = chunk * capped.plan.self_attn[-1].tokens * capped.plan.self_attn[-1].heads * (2 + FP32)
        verdict = "" if ours <= FAMILY_TARGET * reference else " MISSED"
        print(f"| {family} | {width}x{height} | {sides} | {len(capped.plan.cross)} | {ours / 1e6:.1f} MB | "
              f"{ours / reference:.2f}x{verdict} | {uncapped.buffer_bytes() / 1e6:.1f} MB | "
              f"{transient / 1e6:.0f} MB (fp16 scores + fp32 softmax, {chunk} rows; sum {tuple(fine.sum.shape)}) |")


# ---------------------------------------------------------------- 5. MM-DiTs, computed from shapes


@dataclass(frozen=True)
class MMDiT:
    """The shapes of a published MM-DiT that capture memory depends on (their transformer/config.json)."""

    name: str
    blocks: int  # joint-attention blocks (Flux: 19 double-stream + 38 single-stream)
    heads: int
    head_dim: int
    text_tokens: int  # the joint sequence's text part
    native: int  # px
    patch: int = 2
    vae_factor: int = 8


MMDITS = [
    MMDiT("Flux.1-dev", 19 + 38, 24, 128, 512, 1024),  # T5 max_sequence_length 512 (FluxPipeline's default)
    MMDiT("Flux.1-schnell", 19 + 38, 24, 128, 256, 1024),  # the model card's max_sequence_length 256
    MMDiT("SD3-medium", 24, 24, 64, 77 + 256, 1024),  # 77 CLIP (L+G, concatenated on features) + 256 T5
    MMDiT("SD3.5-large", 38, 38, 64, 77 + 256, 1024),
]
MMDIT_SIZES = [(1024, 1024), (832, 1216), (1344, 768)]
# cross blocks per model (bench_mmdit_blocks.py, /work/wt/notes/18-defaults.md): Flux.1 its last 4 double-stream
# blocks, SD3/SD3.5 the 4 blocks at 8/24-11/24 of the depth around Seg4Diff's block 9 of 24
MMDIT_CROSS_BLOCKS = {"Flux.1-dev": 4, "Flux.1-schnell": 4, "SD3-medium": 4, "SD3.5-large": 4}


def mmdit_accumulator_bytes(grid: tuple[int, int], cascade: tuple[int, ...], cross_blocks: int, text_tokens: int,
                            max_self_entries: int | None = MaskConfig().max_self_entries,
                            queries_pooled: bool = True, cross_at_seed_side: bool = True) -> dict[str, int]:
    """fp32 bytes per image a capture holds for a cascade on one token grid (bench_mmdit_cascade.py's contract): one
    self sum for the finest side, the cascade's sides pooled from it (workers/seediff.py pool_self), and the cross
    sums of ``cross_blocks`` blocks for every text token, accumulated already pooled to the seed side (or at the
    full grid). A finest side below the grid (depth d > 0) is accumulated with its query rows pooled in the capture
    (``queries_pooled``: [n_d, n_d]) or with only its keys summed by the existing key pool ([n_0, n_d], the rows
    pooled at the end); past ``max_self_entries`` the keys are summed further, as for UNets."""
    finest = cascade[-1]
    fine = (grid[0] >> finest, grid[1] >> finest)
    f = key_pool(fine, max_self_entries)
    keys = fine[0] * fine[1] // f**2
    queries = fine[0] * fine[1] if queries_pooled or finest == 0 else grid[0] * grid[1]
    derived = [k for k in cascade if k != finest or queries != fine[0] * fine[1]]
    cells = (grid[0] >> cascade[0]) * (grid[1] >> cascade[0]) if cross_at_seed_side else grid[0] * grid[1]
    return {
        "self sum": queries * keys * FP32,
        "sides pooled from it": sum(((grid[0] >> k) * (grid[1] >> k)) ** 2 for k in derived) * FP32,
        "cross sums (all text tokens)": cross_blocks * text_tokens * cells * FP32,
    }


def computed_mmdits(cascade: tuple[int, ...], cross_blocks: dict[str, int], query_chunk: int,
                    alternative: tuple[int, ...] = (2, 1, 0)) -> None:
    """Per MM-DiT and size: accumulators per image for ``cascade`` (and for ``alternative``, the cascade that ends
    at the grid) against SD1.5 512² (computed from the SD1.5 UNet on the meta device, as section 4), and the
    transient of one captured block: the explicit path's query chunk (bf16 scores + fp32 softmax over the whole
    joint key sequence, all heads) or a fused kernel's Q, K and row log-sum-exp."""
    reference = SeeDiffCapture(build_sd15_unet("meta"), SD15_LATENT, 1).buffer_bytes()
    print(f"\n== 5. computed from shapes per MM-DiT: cascade {list(cascade)} on the token grid (depth k = grid / 2^k), "
          f"accumulators per image (fp32) against SD1.5 512² ({reference / 1e6:.1f} MB); target <= {FAMILY_TARGET}x")
    print("| model | size (w x h) | token grid | sides | cross sums (blocks x text tokens) | accumulators, rows "
          f"pooled in the capture | vs SD1.5 | keys-only pooling (rows pooled at the end) | {list(alternative)} "
          f"instead | one block's transient: chunk {query_chunk} / 256 rows / fused |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in MMDITS:
        for width, height in MMDIT_SIZES:
            grid = (height // (m.vae_factor * m.patch), width // (m.vae_factor * m.patch))
            blocks = cross_blocks[m.name]
            parts = mmdit_accumulator_bytes(grid, cascade, blocks, m.text_tokens)
            total = sum(parts.values())
            keys_only = sum(mmdit_accumulator_bytes(grid, cascade, blocks, m.text_tokens, queries_pooled=False).values())
            other = sum(mmdit_accumulator_bytes(grid, alternative, blocks, m.text_tokens).values())
            n, keys, inner = grid[0] * grid[1], grid[0] * grid[1] + m.text_tokens, m.heads * m.head_dim
            chunked = [min(c, n) * keys * m.heads * (2 + FP32) for c in (query_chunk, 256)]
            fused = 2 * keys * inner * 2 + m.heads * n * FP32
            sides = " → ".join(f"{grid[1] >> k}x{grid[0] >> k}" for k in cascade)
            verdict = "" if total <= FAMILY_TARGET * reference else " MISSED"
            print(f"| {m.name} | {width}x{height} | {grid[1]}x{grid[0]} | {sides} | {blocks} x {m.text_tokens}: "
                  f"{parts['cross sums (all text tokens)'] / 1e6:.2f} MB | {total / 1e6:.1f} MB | "
                  f"{total / reference:.2f}x{verdict} | {keys_only / 1e6:.1f} MB ({keys_only / reference:.2f}x) | "
                  f"{other / 1e6:.1f} MB ({other / reference:.2f}x) | "
                  f"{chunked[0] / 1e6:.0f} / {chunked[1] / 1e6:.0f} / {fused / 1e6:.1f} MB |")


# ---------------------------------------------------------------- 2./3. measured


class CudaPeak(AbstractContextManager):
    """Peak of torch.cuda.memory_allocated inside the block, above its value at entry."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.start


class CpuPeak(AbstractContextManager):
    """Peak of live torch CPU tensor bytes inside the block, above entry, from the allocator's profiler events."""

    def __enter__(self):
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        events = [e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = self.peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            if event.device_type() == torch.autograd.DeviceType.CPU:
                live += event.nbytes()
                self.peak = max(self.peak, live)


def generate(unet: UNet2DConditionModel, batch: int, steps: int, text_dim: int, captured: bool,
             query_chunk: int) -> tuple[int, int]:
    """A DDIM loop with classifier-free guidance over random latents and text embeddings (text encoder and VAE cost
    the same with or without capture, so they are left out). Returns (accumulator bytes, UNet calls captured)."""
    device, dtype = unet.device, unet.dtype
    side = unet.config.sample_size
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, side, side, generator=generator, device=device, dtype=dtype)
    context = torch.randn(2 * batch, SD15_TEXT_TOKENS, text_dim, generator=generator, device=device, dtype=dtype)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    capture = SeeDiffCapture(unet, side, batch, query_chunk=query_chunk).begin([CLASS_TOKEN] * batch) if captured else None
    with torch.no_grad(), capture if captured else nullcontext():
        for t in scheduler.timesteps:
            uncond, cond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uncond + 7.0 * (cond - uncond), t, latents).prev_sample
            if capture is not None:
                capture.advance()
    if capture is None:
        return 0, 0
    maps = capture.result()  # the time averages SeeDiff reads: part of the cost, so inside the measured block
    return capture.buffer_bytes(), maps.calls


def measured(unet: UNet2DConditionModel, batch: int, steps_list: list[int], text_dim: int, query_chunk: int,
             meter: Callable[[], CudaPeak | CpuPeak], judge: bool) -> None:
    """``judge``: compare with the target, which holds for the SD1.5 UNet only (a smaller UNet's own activation peak
    hides less of the capture transient)."""
    generate(unet, batch, 1, text_dim, True, query_chunk)  # warm-up: lazy inits and kernel caches outside the meter
    rows = {}
    for steps in steps_list:
        for captured in (False, True):
            with meter() as peak:
                accumulators, calls = generate(unet, batch, steps, text_dim, captured, query_chunk)
            rows[steps, captured] = accumulators, calls, peak.peak
    print(f"batch {batch} (x2 with guidance), query_chunk {query_chunk}; per image = / {batch}")
    print(f"  {'steps':>5s} {'capture':>7s} {'calls':>5s} {'accumulators/image':>30s} {'peak above start/image':>30s}")
    for (steps, captured), (acc, calls, peak) in rows.items():
        print(f"  {steps:5d} {captured!s:>7s} {calls:5d} {fmt(acc / batch)} {fmt(peak / batch)}")
    for steps in steps_list:
        extra = (rows[steps, True][2] - rows[steps, False][2]) / batch
        verdict = f"  target <= {TARGET_BYTES / 1e6:.0f} MB: {'met' if extra <= TARGET_BYTES else 'MISSED'}"
        print(f"  {steps:5d} steps: peak with capture - without, per image {fmt(extra)}{verdict if judge else ''}")
    accumulators = {rows[s, True][0] for s in steps_list}
    print(f"  accumulator bytes equal for steps {steps_list}: {len(accumulators) == 1}")
    chunked = sum(fine_self_transient(unet, unet.config.sample_size, query_chunk).values())
    print(f"  computed for this UNet: accumulators {fmt(rows[steps_list[0], True][0] / batch)}, fine-layer "
          f"transient ({unet.dtype}), chunked path {fmt(chunked)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="images per generation (CPU 2, CUDA 8)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (CPU 2 20, CUDA 2 5)")
    parser.add_argument("--query-chunk", type=int, default=MaskConfig().query_chunk)
    parser.add_argument("--latent", type=int, default=32, help="CPU only: latent side of the small UNet")
    parser.add_argument("--cuda", action="store_true", help="measure the SD1.5 UNet in fp16 on the GPU")
    parser.add_argument("--computed-only", action="store_true", help="sections 1, 4 and 5 only (no measured run)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # .to(float16) warns about fp32-kept modules that SD1.5 does not have

    computed_sd15(args.query_chunk)
    computed_families(args.query_chunk)
    from bench.bench_mmdit_cascade import CHOSEN  # here: that benchmark imports this module

    computed_mmdits(CHOSEN, MMDIT_CROSS_BLOCKS, args.query_chunk)
    if args.computed_only:
        return
    if args.cuda:
        batch, steps = args.batch or 8, args.steps or [2, 5]
        print(f"\n== 3. measured on {torch.cuda.get_device_name()}: SD1.5 UNet, random weights, fp16, latent "
              f"{SD15_LATENT}, torch.cuda.max_memory_allocated")
        unet = build_sd15_unet("cuda", torch.float16)
        measured(unet, batch, steps, SD15_TEXT_DIM, args.query_chunk, CudaPeak, judge=True)
    else:
        batch, steps = args.batch or 2, args.steps or [2, 20]
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SMALL_UNET, "sample_size": args.latent}).eval()
        print(f"\n== 2. measured on CPU: small random UNet (channels {SMALL_UNET['block_out_channels']}, "
              f"{SMALL_UNET['attention_head_dim']} heads, latent {args.latent}), fp32, profiler allocator events")
        measured(unet, batch, steps, SMALL_UNET["cross_attention_dim"], args.query_chunk, CpuPeak, judge=False)


if __name__ == "__main__":
    main()
