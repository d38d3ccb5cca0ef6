"""Which cascade of sides SeeDiff runs on an MM-DiT's one image-token grid, measured on synthetic scenes with known
label maps (bench/mmdit_scenes.py) in one run.

A UNet gives SeeDiff self-attention at three sides from three layers (SD1.x at 512 px: 16 -> 32 -> 64). Flux.1 and
SD3 attend on one grid (64 x 64 tokens at 1024²). Every design below hands ``label_maps`` (unchanged) maps derived
from what one capture holds -- the cross maps of the chosen blocks and one self-attention sum at the finest side --
by pooling (``pool_cross``: f x f block average; ``pool_self``: query rows averaged, keys summed in f x f blocks).
A design is its depths k (side = grid / 2^k), coarse first: seeds and expansion at the first, background-seeded
refinement at each finer one. Designs: one side at the grid; grid/2 -> grid; grid/4 -> grid/2 -> grid (SeeDiff's
proportions); grid/8 -> ... -> grid; the same three sides with the fine keys summed 2 x 2 (memory cap); grid/4 ->
grid/2 (no full-grid side: the capture would accumulate the grid/2 side pooled, 16x less memory); one side at
grid/4.

Per regime (clean / mmdit / hard, bench/mmdit_scenes.py) and design: mIoU against the truth over background and
the scene's classes, for refine none with no ignore band and for the default recipe (PAMR, ignore band 0.3; mIoU
on the pixels not labelled 255), mean ± std over the scenes and the worst scene; the ignore fraction; the time of
label_maps (no PAMR) per image on this CPU; and the accumulator bytes per image this design needs on Flux.1-dev at
1024² (bench_memory.mmdit_accumulator_bytes, 4 cross blocks x 512 text tokens).

    python bench/bench_mmdit_cascade.py [--seeds 3] [--grid 64 64] [--px 2] [--regimes clean mmdit hard]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_memory import mmdit_accumulator_bytes  # noqa: E402
from bench.bench_scenes import scene_miou  # noqa: E402
from bench.mmdit_scenes import KINDS_MMDIT, REGIMES, arguments, attention_maps, cross_map, scenes, self_map  # noqa: E402
from seediff.schemas.config import MaskConfig  # noqa: E402
from seediff.workers.seediff import label_maps, label_pixels  # noqa: E402

# (name, depths coarse first, keys of the finest side summed f x f)
DESIGNS = [
    ("grid (one side)", (0,), 1),
    ("grid/2 → grid", (1, 0), 1),
    ("grid/4 → grid/2 → grid", (2, 1, 0), 1),
    ("grid/8 → grid/4 → grid/2 → grid", (3, 2, 1, 0), 1),
    ("grid/4 → grid/2 → grid, fine keys 2x2", (2, 1, 0), 2),
    ("grid/4 → grid/2 (no grid side)", (2, 1), 1),
    ("grid/4 (one side)", (2,), 1),
]
CHOSEN = (2, 1)  # the cascade this benchmark chose (bench/RESULTS.md): the other MM-DiT benchmarks run it
CROSS_BLOCKS = 4  # Flux's last 4 double-stream blocks (bench_mmdit_blocks.py)
FLUX_GRID, FLUX_TEXT = (64, 64), 512
BATCH = 3  # scenes per label_maps call


def class_maps(layouts, regime, g: torch.Generator, blocks: int = CROSS_BLOCKS) -> list[list[torch.Tensor]]:
    """Per scene, per class: [blocks, h, w] cross maps at the grid."""
    per_block = [[cross_map(s, regime, g) for _ in range(blocks)] for s in layouts]
    return [[torch.stack([b[c] for b in maps]) for c in range(len(s.class_ids))] for s, maps in zip(layouts, per_block)]


def evaluate(layouts, scores_none, scores_pamr) -> dict[str, list[float]]:
    default = MaskConfig()
    out = {"none": [], "pamr": [], "pamr_band0": [], "ignore": []}
    for s, none, pamr in zip(layouts, scores_none, scores_pamr):
        ids = torch.tensor([s.class_ids])
        k = len(s.class_ids)
        plain = label_pixels(none[None, :k], ids, default.threshold, 0.0, 0.0)[0].numpy()
        recipe = label_pixels(pamr[None, :k], ids, default.pamr_output_threshold, default.ignore_band,
                              default.ignore_margin)[0].numpy()
        band0 = label_pixels(pamr[None, :k], ids, default.pamr_output_threshold, 0.0, 0.0)[0].numpy()
        out["none"].append(scene_miou(plain, s.truth, s.class_ids))
        out["pamr"].append(scene_miou(recipe, s.truth, s.class_ids))
        out["pamr_band0"].append(scene_miou(band0, s.truth, s.class_ids))
        out["ignore"].append(float((recipe == 255).mean()))
    return out


def run_regime(regime, grid, px, seeds, pamr_iterations) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    layouts = scenes(regime, grid, px, seeds)
    image = (grid[0] * px, grid[1] * px)
    none = MaskConfig(refine="none", ignore_band=0.0)
    pamr = MaskConfig(pamr_iterations=pamr_iterations)
    results = {name: {"none": [], "pamr": [], "pamr_band0": [], "ignore": [], "seconds": [], "kinds": []}
               for name, _, _ in DESIGNS}
    for start in range(0, len(layouts), BATCH):
        batch = layouts[start : start + BATCH]
        cross = class_maps(batch, regime, g)
        full_self = torch.stack([self_map(s, regime, g) for s in batch])
        ids = [s.class_ids for s in batch]
        images = torch.stack([s.image for s in batch])
        for name, cascade, key_pool in DESIGNS:
            started = time.perf_counter()
            maps = attention_maps(cross, full_self, grid, cascade, key_pool)
            plain = label_maps(maps, ids, image, none)
            seconds = time.perf_counter() - started
            recipe = label_maps(maps, ids, image, pamr, images)
            row = results[name]
            for key, values in evaluate(batch, plain.scores, recipe.scores).items():
                row[key] += values
            row["seconds"].append(seconds / len(batch))
            row["kinds"] += [s.kind for s in batch]
        del full_self
    return results


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} (min {np.min(values):.3f})"


def worst_kind(row) -> str:
    by_kind: dict[str, list[float]] = {}
    for kind, v in zip(row["kinds"], row["pamr"]):
        by_kind.setdefault(kind, []).append(v)
    kind = min(by_kind, key=lambda k: np.mean(by_kind[k]))
    return f"{kind} ({np.mean(by_kind[kind]):.3f})"


def main() -> None:
    args = arguments(__doc__, seeds=3, grid=FLUX_GRID, regimes=list(REGIMES))
    grid = args.grid
    memory = {name: sum(mmdit_accumulator_bytes(FLUX_GRID, cascade, CROSS_BLOCKS, FLUX_TEXT,
                                                 max_self_entries=None if key_pool == 1 else
                                                 (4096 * 4096) // key_pool**2).values())
              for name, cascade, key_pool in DESIGNS}
    print(f"grid {grid[1]}x{grid[0]} tokens, image {grid[1] * args.px}x{grid[0] * args.px} px, {args.seeds} seeds x "
          f"{len(KINDS_MMDIT)} scene kinds per regime, {CROSS_BLOCKS} cross blocks, PAMR {args.pamr_iterations} iterations, 1 thread\n")
    print("| regime | design | mIoU, none, no band | mIoU, default recipe (PAMR, band 0.3; kept px) | PAMR, no band | "
          "ignore | worst kind (recipe) | pooling + label_maps s/image (none) | Flux 1024² accumulators |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, list[float]] = {}
    for regime_name in args.regimes:
        results = run_regime(REGIMES[regime_name], grid, args.px, args.seeds, args.pamr_iterations)
        for name, row in results.items():
            summary.setdefault(name, []).append(float(np.mean(row["pamr"])))
            print(f"| {regime_name} | {name} | {spread(row['none'])} | {spread(row['pamr'])} | "
                  f"{np.mean(row['pamr_band0']):.3f} | {np.mean(row['ignore']):.3f} | {worst_kind(row)} | "
                  f"{np.median(row['seconds']):.3f} | {memory[name] / 1e6:.1f} MB |", flush=True)
    print("\nmean over regimes of the default recipe's mIoU:")
    for name, values in sorted(summary.items(), key=lambda kv: -np.mean(kv[1])):
        print(f"  {np.mean(values):.3f}  {name}")


if __name__ == "__main__":
    main()
