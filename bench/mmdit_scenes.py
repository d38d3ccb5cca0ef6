"""Synthetic scenes as an MM-DiT's joint attention shows them, on its one image-token grid (64 x 64 at 1024² for
Flux.1 and SD3), for the benchmarks that choose the MM-DiT defaults (bench_mmdit_cascade.py, bench_mmdit_blocks.py,
bench_few_step.py). The object layouts are bench/bench_scenes.py's kinds and two small/thin ones
(``KINDS_MMDIT``), scaled to the grid.

What the model puts in, and why (a UNet's maps at 16/32/64 come from different layers; an MM-DiT's all come from
one grid, so what matters is how noisy one token's row is, and how local):
- self map = the image x image part of a joint softmax, heads summed: logits = ``group`` x (the two tokens' shared
  region cover) + ``local`` x exp(-d² / 2 reach²) (RoPE's positional bias: near tokens attend to each other whatever
  they show) + ``self_noise`` x N(0, 1) per entry + ``sink_boost`` on a few sink tokens' key columns (the high-norm
  tokens every query attends to in DiTs); each row then loses its mass on text keys (a fraction drawn per row), as
  the joint softmax is not renormalised over image keys.
- cross map of a class token = its objects' cover, blurred by ``cross_blur`` tokens, times a gain per block, plus
  uniform noise per token (``cross_noise``), a smooth background clutter field (``clutter``) and the sink tokens.
A regime is one setting of these; "clean" is the UNet scenes' noise at the token grid, "mmdit" and "hard" are
noisier and more local. None is fitted to a real model (no weights here): the benchmarks report every regime.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np
import torch

from bench.bench_scenes import KINDS
from seediff.schemas.config import MaskConfig
from seediff.workers.seediff import AttentionMaps, pool_cross, pool_self
from tests.test_label_maps import SceneObject
from tests.test_seediff import IMAGE as KIND_IMAGE, object_mask

HEADS = 24  # Flux.1 and SD3 (24 x 64 / 24 x 128)
# bench_scenes' kinds plus the two that a coarse finest side would lose (sizes in its 64 px square): a thin bar
# (about 5 tokens tall at 64 x 64 tokens) beside a disc, and a small disc (radius 5 tokens) beside a large square
KINDS_MMDIT = {
    **KINDS,
    "thin bar + disc": [SceneObject("bar", 18, 32, 4, 3), SceneObject("disc", 44, 32, 11, 8)],
    "small object": [SceneObject("disc", 16, 48, 5, 3), SceneObject("square", 40, 24, 14, 8)],
}


@dataclass(frozen=True)
class Regime:
    name: str
    group: float  # self logit bonus between tokens of one region
    local: float  # self logit bonus of near tokens (positional)
    reach: float  # its length, tokens
    self_noise: float  # sigma of the iid self logit noise
    sink_fraction: float  # tokens that are attention sinks
    sink_boost: float  # their key columns' logit bonus
    cross_noise: float  # uniform noise amplitude per token in a cross map (object peak ~1)
    cross_blur: float  # gaussian sigma of the cross peak, tokens
    clutter: float  # amplitude of smooth background clutter in a cross map
    text_mass: tuple[float, float] = (0.2, 0.6)  # range of a row's attention mass on text keys


REGIMES = {
    "clean": Regime("clean", group=3.0, local=0.0, reach=1.0, self_noise=0.3, sink_fraction=0.0, sink_boost=0.0,
                    cross_noise=0.15, cross_blur=1.0, clutter=0.0),
    "mmdit": Regime("mmdit", group=1.5, local=1.5, reach=4.0, self_noise=0.8, sink_fraction=0.003, sink_boost=4.0,
                    cross_noise=0.6, cross_blur=1.5, clutter=0.3),
    "hard": Regime("hard", group=1.0, local=2.5, reach=3.0, self_noise=1.0, sink_fraction=0.005, sink_boost=5.0,
                   cross_noise=1.0, cross_blur=2.0, clutter=0.5),
}


@dataclass
class Layout:
    """One scene's geometry on a token grid."""

    kind: str
    truth: np.ndarray  # [H, W] uint8 label map at the image size
    class_ids: list[int]
    cover: np.ndarray  # [regions + 1, h*w] fraction of each token covered by each region (0 = background)
    peaks: list[np.ndarray]  # per class [h, w]: its objects' cover weighted by strength (and leaks)
    sinks: np.ndarray  # [n_sinks] token indices
    image: torch.Tensor  # [3, H, W] float 0-255
    grid: tuple[int, int]


def layout(kind: str, objects: list[SceneObject], grid: tuple[int, int], px: int, seed: int,
           sink_fraction: float) -> Layout:
    """The kind's objects scaled from bench_scenes' 64 px square to the image (``px`` pixels per token); the grid
    may be non-square (objects scale by the shorter side and sit centred on the longer)."""
    rng = np.random.default_rng(seed)
    h, w = grid
    size = (h * px, w * px)
    scale = min(size) / KIND_IMAGE
    regions = np.zeros(size, np.int64)
    for i, o in enumerate(objects, 1):
        square = object_mask(o.kind, o.cy * scale, o.cx * scale, o.r * scale, max(size))
        top, left = (max(size) - size[0]) // 2, (max(size) - size[1]) // 2
        regions[square[top : top + size[0], left : left + size[1]]] = i
    truth = np.array([0] + [o.class_id for o in objects], np.uint8)[regions]
    cover = np.stack([cv2.resize((regions == r).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                      for r in range(len(objects) + 1)]).reshape(len(objects) + 1, -1)
    class_ids = list(dict.fromkeys(o.class_id for o in objects))
    peaks = []
    for class_id in class_ids:
        peak = np.zeros(h * w, np.float32)
        for i, o in enumerate(objects, 1):
            peak += (o.strength if o.class_id == class_id else o.leaks.get(class_id, 0.0)) * cover[i]
        peaks.append(peak.reshape(h, w))
    sinks = rng.choice(h * w, size=int(round(sink_fraction * h * w)), replace=False)
    palette = rng.uniform(30, 225, (len(objects) + 1, 3))
    image = np.clip(palette[regions].transpose(2, 0, 1) + rng.normal(0, 6, (3, *size)), 0, 255)
    return Layout(kind, truth, class_ids, cover, peaks, sinks, torch.from_numpy(image.astype(np.float32)), grid)


@lru_cache(maxsize=4)
def _locality(grid: tuple[int, int], reach: float) -> torch.Tensor:
    yy, xx = np.mgrid[0 : grid[0], 0 : grid[1]]
    pos = torch.from_numpy(np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32))
    return torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * reach**2))


def self_map(scene: Layout, regime: Regime, g: torch.Generator, group_scale: float = 1.0) -> torch.Tensor:
    """Head-summed image x image attention [N, N] of one block (one call): see the module doc."""
    cover = torch.from_numpy(scene.cover)
    logits = (regime.group * group_scale) * (cover.T @ cover)
    if regime.local:
        logits += regime.local * _locality(scene.grid, regime.reach)
    logits += regime.self_noise * torch.randn(logits.shape, generator=g)
    if len(scene.sinks):
        logits[:, torch.from_numpy(scene.sinks)] += regime.sink_boost
    lo, hi = regime.text_mass
    image_mass = 1 - (lo + (hi - lo) * torch.rand(logits.shape[0], 1, generator=g))
    return HEADS * image_mass * torch.softmax(logits, dim=-1)


def _clutter(grid: tuple[int, int], g: torch.Generator) -> np.ndarray:
    field = torch.randn(grid, generator=g).numpy()
    field = cv2.GaussianBlur(field, (0, 0), max(grid) / 10)
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def cross_map(scene: Layout, regime: Regime, g: torch.Generator, strength: float = 1.0,
              positional: np.ndarray | None = None) -> torch.Tensor:
    """One block's (one call's) cross maps [classes, h, w] at the grid: see the module doc. ``strength`` scales the
    object-aligned part (a block's grounding); ``positional`` [h, w] is added to every class (a block that attends by
    position, not content)."""
    maps = []
    for peak in scene.peaks:
        blurred = cv2.GaussianBlur(peak, (0, 0), regime.cross_blur) if regime.cross_blur else peak
        gain = 0.5 + torch.rand(1, generator=g).item()
        m = strength * gain * blurred + regime.cross_noise * torch.rand(scene.grid, generator=g).numpy()
        if regime.clutter:
            m = m + regime.clutter * _clutter(scene.grid, g)
        if positional is not None:
            m = m + positional
        m = m.reshape(-1)
        m[scene.sinks] += 1.0
        maps.append(torch.from_numpy(m.reshape(scene.grid).astype(np.float32)))
    return torch.stack(maps)


def scenes(regime: Regime, grid: tuple[int, int], px: int, seeds: int, kinds: dict = KINDS_MMDIT) -> list[Layout]:
    return [layout(kind, objects, grid, px, 1000 * i + seed, regime.sink_fraction)
            for i, (kind, objects) in enumerate(kinds.items()) for seed in range(seeds)]


def attention_maps(cross: list[torch.Tensor], full_self: torch.Tensor, grid: tuple[int, int],
                   cascade: tuple[int, ...], fine_key_pool: int = 1) -> AttentionMaps:
    """The maps a capture hands label_maps for a cascade of depths (grid / 2^k, coarse first) on one grid: per sample
    and class its blocks' cross maps pooled to the seed side ([blocks, h/2^k0, w/2^k0]); self sides pooled from the
    one fine sum ``full_self`` [B, N, N] (its keys summed ``fine_key_pool`` x ``fine_key_pool`` first, as the
    capture's memory cap would)."""
    fine = full_self if fine_key_pool == 1 else pool_keys(full_self, grid, fine_key_pool)
    if cascade[-1] > 0:  # the finest side is itself pooled: the capture would accumulate it pooled
        fine = pool_self(fine, grid, 2 ** cascade[-1])
        base = (grid[0] >> cascade[-1], grid[1] >> cascade[-1])
    else:
        base = grid
    sides = [fine]
    for _ in cascade[:-1]:  # each coarser side from the next finer one (block means of block means: the same)
        sides.insert(0, pool_self(sides[0], (base[0] >> (len(sides) - 1), base[1] >> (len(sides) - 1)), 2))
    factor = 2 ** cascade[0]
    crosses = [[pool_cross(c, factor) for c in per_class] for per_class in cross]
    return AttentionMaps(crosses, sides)


def pool_keys(attn: torch.Tensor, grid: tuple[int, int], f: int) -> torch.Tensor:
    """[B, N, N] -> [B, N, N / f²]: keys summed in f x f blocks (what mask.max_self_entries makes the capture do)."""
    h, w = grid
    return attn.reshape(*attn.shape[:2], h // f, f, w // f, f).sum((3, 5)).flatten(2)


def with_noise(regime: Regime, scale: float) -> Regime:
    """The regime with its per-entry noises scaled (one call of a few-step run vs a time average)."""
    return replace(regime, self_noise=regime.self_noise * scale, cross_noise=regime.cross_noise * scale)


def arguments(doc: str, seeds: int, grid: tuple[int, int], regimes: list[str]) -> argparse.Namespace:
    """The benchmarks' common flags (and one torch thread: the machine is shared); ``grid`` comes back a tuple."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=seeds, help="scenes per kind")
    parser.add_argument("--grid", type=int, nargs=2, default=list(grid), metavar=("H", "W"), help="token grid")
    parser.add_argument("--px", type=int, default=2, help="image pixels per token (the real models: 16)")
    parser.add_argument("--pamr-iterations", type=int, default=MaskConfig().pamr_iterations)
    parser.add_argument("--regimes", nargs="+", default=regimes, choices=list(REGIMES))
    args = parser.parse_args()
    args.grid = tuple(args.grid)
    torch.set_num_threads(1)
    return args
