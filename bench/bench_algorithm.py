"""Speed of seediff.workers.seediff on one device, measured in one run.

Prints, for a batch of random attention at SD-like sizes (coarse 16, middle 32, fine 64, image 512):
- seeded_masks without PAMR, and PAMR alone (config iterations), in ms per batch;
- the batched expansion versus the official code's per-seed cosine loop (same device, same seeds): ratio;
- our shifted-slice PAMR versus the official conv-kernel PAMR (same device, same iterations): ratio;
- the largest soft-map difference between this device and the CPU (numerical agreement check).

    python bench/bench_algorithm.py --device cuda --batch 8
    python bench/bench_algorithm.py --device cpu --batch 1 --side 8 --image 128 --iterations 50   # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seediff.schemas.config import MaskConfig  # noqa: E402
from tests.test_seediff import official_style_pamr  # noqa: E402  (the official PAMR formulation, kept in one place)
from seediff.workers.seediff import AttentionMaps, pamr, seed_affinity, seeded_masks  # noqa: E402


def random_batch(batch: int, side: int, image: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def attn(n: int) -> torch.Tensor:
        return (8 * torch.randn(batch, n, n, generator=g).mul(2).softmax(-1)).to(device)

    cross = [torch.rand(5, side, side, generator=g).pow(3).to(device) for _ in range(batch)]
    maps = AttentionMaps(cross, [attn(side**2), attn((2 * side) ** 2), attn((4 * side) ** 2)])
    images = (torch.rand(batch, 3, image, image, generator=g) * 255).to(device)
    return maps, images


def timed(fn, device: torch.device, repeat: int = 3) -> tuple[float, object]:
    """Best wall time in ms over `repeat` runs (after one warm-up), and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best, out


def per_seed_loop(attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The official expansion: one cosine-similarity pass over all rows per seed, summed."""
    cos = torch.nn.CosineSimilarity(dim=1)
    out = torch.zeros(attn.shape[:2], device=attn.device)
    for b in range(attn.shape[0]):
        for idx in torch.nonzero(seeds[b]).flatten().tolist():
            out[b] += cos(attn[b], attn[b, idx][None])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=MaskConfig().pamr_iterations)
    args = parser.parse_args()
    device = torch.device(args.device)
    maps, images = random_batch(args.batch, args.side, args.image, device)
    size = (args.image, args.image)
    print(f"device={device} batch={args.batch} sides={args.side}/{2 * args.side}/{4 * args.side} image={args.image}")

    ms_masks, result = timed(lambda: seeded_masks(maps, size, MaskConfig(refine="none")), device)
    print(f"seeded_masks (no PAMR): {ms_masks:.1f} ms/batch")

    soft_mask = (result.soft > 0.3).float()
    ms_pamr, _ = timed(lambda: pamr(images, soft_mask, args.iterations), device)
    ms_pamr_official, _ = timed(lambda: official_style_pamr(images, soft_mask, args.iterations), device, repeat=1)
    print(f"PAMR x{args.iterations}: ours {ms_pamr:.1f} ms/batch, official kernels {ms_pamr_official:.1f} ms/batch, "
          f"speed-up {ms_pamr_official / ms_pamr:.1f}x")

    fine = maps.self_attn[-1].float()
    background = torch.rand(fine.shape[:2], device=device) < 0.7  # a fine-scale background seed set
    ms_batched, ours = timed(lambda: seed_affinity(fine, background[:, None])[:, 0], device)
    ms_loop, theirs = timed(lambda: per_seed_loop(fine, background), device, repeat=1)
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"fine-scale expansion ({int(background.sum())} seeds): batched {ms_batched:.2f} ms, per-seed loop "
          f"{ms_loop:.1f} ms, speed-up {ms_loop / ms_batched:.0f}x, max rel diff {rel:.1e}")

    if device.type != "cpu":
        cpu_maps = AttentionMaps([m.cpu() for m in maps.cross], [a.cpu() for a in maps.self_attn])
        cpu = seeded_masks(cpu_maps, size, MaskConfig(refine="none"))
        diff = (cpu.soft - result.soft.cpu()).abs().max().item()
        agree = (cpu.mask == result.mask.cpu()).float().mean().item()
        print(f"{device} vs cpu: max soft diff {diff:.1e}, mask agreement {agree:.6f}, "
              f"seeds equal {torch.equal(cpu.seeds, result.seeds.cpu())}")


if __name__ == "__main__":
    main()
