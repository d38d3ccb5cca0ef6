"""What summing the keys of the largest self-attention side in f x f blocks (``mask.max_self_entries``, the memory
cap that keeps SD 2.1-768 and large non-square sizes near SD1.5's capture memory) does to the masks: soft-map
difference and mask IoU against full fp32 rows on the same inputs.

1. Synthetic scenes with known objects (self-attention peaked within each object and the background, blurred noisy
   class maps) at the sides of SD 2.1 at 768² (24 -> 48 -> 96, f = 3) and SD 1.x/2.x at 1024x576 (18x32 -> 72x128,
   f = 4). The pooled rows are the full rows summed over key blocks, exactly what the capped accumulator holds (the
   sum is linear, so it commutes with the time average).
2. The real capture path: a miniature SD 2.1-768-shaped random-weight pipeline at 768² (latent 96, so the fine side
   has 9216 queries like the real model's), generated twice with the same seeds, once capped (f = 3) and once
   uncapped. Random weights make meaningless images, but the two runs see identical inputs.

    python -m bench.bench_key_pool [--scenes 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from seediff.schemas.config import MaskConfig, RunConfig
from seediff.schemas.manifest import class_row
from seediff.schemas.records import SampleSpec
from seediff.workers.capture import key_pool
from seediff.workers.batch import label_batch
from seediff.workers.generate import GENERATION
from seediff.workers.models import build_tiny_model
from seediff.workers.seediff import AttentionMaps, seeded_masks

HEADS = 10
# (name, coarse grid (h, w), image (h, w))
CASES = [("SD2.1-768 at 768x768", (24, 24), (768, 768)), ("SD1.x/2.x at 1024x576", (18, 32), (576, 1024))]
# miniature SD 2.1-768 (tests/plugins/tiny_sd.py's shape, native 768 px)
SD21_768 = dict(
    unet_overrides=dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True,
                        sample_size=96),
    text_overrides=dict(hidden_size=48, num_attention_heads=4),
    scheduler_overrides={"prediction_type": "v_prediction"},
)


def object_mask(image: tuple[int, int], seed: int) -> torch.Tensor:
    """A disc or a square at a random place covering 10-35 % of the image, [H, W] bool."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
    r = (0.18 + 0.15 * torch.rand(1, generator=g)).item() * min(h, w)
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    if seed % 2:
        return ((yy - cy * h) ** 2 + (xx - cx * w) ** 2) <= r**2
    return ((yy - cy * h).abs() <= r) & ((xx - cx * w).abs() <= r)


def cells(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Object label per cell (more than half its pixels are object), flattened."""
    return F.adaptive_avg_pool2d(mask.float()[None, None], grid)[0, 0].flatten() > 0.5


def self_attention(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Head-summed attention [N, N]: cells attend mostly to cells of their own region, plus noise."""
    same = (labels[:, None] == labels[None, :]).float()
    logits = 3.0 * same + 0.3 * torch.randn(same.shape, generator=g)
    return HEADS * torch.softmax(logits, dim=-1)


def cross_attention(labels: torch.Tensor, grid: tuple[int, int], g: torch.Generator, layers: int = 5) -> torch.Tensor:
    obj = labels.view(1, 1, *grid).float()
    blurred = F.avg_pool2d(F.pad(obj, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
    return torch.stack([blurred * (0.5 + torch.rand(1, generator=g)) + 0.15 * torch.rand(grid, generator=g)
                        for _ in range(layers)])


def pooled(attn: torch.Tensor, grid: tuple[int, int], f: int) -> torch.Tensor:
    """[B, N, N] -> [B, N, N / f²], keys summed over f x f blocks of the grid."""
    h, w = grid
    return attn.reshape(attn.shape[0], attn.shape[1], h // f, f, w // f, f).sum((3, 5)).flatten(2)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def compare(full, reduced, truth=None) -> dict[str, float]:
    row = {
        "soft max |diff|": (full.soft - reduced.soft).abs().max().item(),
        "soft mean |diff|": (full.soft - reduced.soft).abs().mean().item(),
        "mask IoU full vs pooled": iou(full.mask[0], reduced.mask[0]),
        "pixels that differ": (full.mask != reduced.mask).float().mean().item(),
    }
    if truth is not None:
        row["IoU vs object: full"] = iou(full.mask[0], truth)
        row["IoU vs object: pooled"] = iou(reduced.mask[0], truth)
    return row


def print_rows(title: str, rows: list[dict[str, float]]) -> None:
    print(title)
    for name in rows[0]:
        values = [r[name] for r in rows]
        print(f"  {name:26s} mean {sum(values) / len(values):.4f}  worst {max(values) if 'diff' in name or 'differ' in name else min(values):.4f}")


def synthetic(scenes: int) -> None:
    cap = MaskConfig().max_self_entries
    for name, coarse, image in CASES:
        grids = [(coarse[0] * 2**i, coarse[1] * 2**i) for i in range(3)]
        f = key_pool(grids[-1], cap)
        for config in (MaskConfig(refine="none"), MaskConfig()):
            rows = []
            for seed in range(scenes):
                g = torch.Generator().manual_seed(seed)
                truth = object_mask(image, seed)
                labels = [cells(truth, grid) for grid in grids]
                attn = [self_attention(l, g)[None] for l in labels]
                cross = [cross_attention(labels[0], coarse, g)]
                colour = torch.where(truth, torch.tensor([200.0, 60, 50])[:, None, None],
                                     torch.tensor([40.0, 120, 210])[:, None, None])
                images = (colour + 6 * torch.randn(colour.shape, generator=g)).clamp(0, 255)[None]
                full = seeded_masks(AttentionMaps(cross, attn), image, config, images)
                reduced = seeded_masks(AttentionMaps(cross, attn[:2] + [pooled(attn[2], grids[2], f)]), image,
                                       config, images)
                rows.append(compare(full, reduced, truth))
                del attn
            print_rows(f"{name}: fine side {grids[-1][1]}x{grids[-1][0]} ({grids[-1][0] * grids[-1][1]} queries), keys "
                       f"pooled {f}x{f}; {scenes} scenes; refine={config.refine}", rows)


def captured(steps: int) -> None:
    torch.set_num_threads(2)
    pipe = build_tiny_model(**SD21_768)
    pipe.set_progress_bar_config(disable=True)
    rows = [class_row(name, i + 1, 1, f"a photo of a {name}", "", i + 1) for i, name in enumerate(("dog", "cat"))]
    specs = [SampleSpec(i, i, 0, 1000 + i, row) for i, row in enumerate(rows)]
    outs = {}
    for label, cap in (("pooled", MaskConfig().max_self_entries), ("full", 10**12)):
        config = RunConfig(model="tiny-sd21-768", family="sd2", resolution=768, steps=steps, guidance_scale=7.5,
                           batch_size=2, mask=MaskConfig(max_self_entries=cap, pamr_iterations=500))
        started = time.perf_counter()
        outs[label] = label_batch(pipe, specs, config, GENERATION)
        print(f"  {label}: {time.perf_counter() - started:.1f} s for {len(specs)} images")
    print(f"captured on the real path: miniature SD 2.1-768 at 768x768, {steps} steps, same seeds (f = 3):")
    for a, b in zip(outs["full"], outs["pooled"]):
        same = (a.image.rgb == b.image.rgb).all()
        full, reduced = a.labels > 0, b.labels > 0
        print(f"  {a.image.spec.classes[0].name}: identical images {bool(same)}, mask IoU full vs pooled "
              f"{iou(torch.from_numpy(full), torch.from_numpy(reduced)):.4f}, pixels that differ "
              f"{(full != reduced).mean():.4f}, foreground {full.mean():.3f} / {reduced.mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    synthetic(args.scenes)
    captured(args.steps)


if __name__ == "__main__":
    main()
