"""How the masks change when the attention maps average 1, 2, 4 or 30 model calls (few-step checkpoints:
Flux.1-schnell 4 steps, SDXL-Turbo/Lightning 1-4, LCM), measured on synthetic scenes with known label maps
(bench/mmdit_scenes.py) in one run, on the MM-DiT cascade of bench_mmdit_cascade.py.

Each call's attention is drawn from one scene plus that call's noise (the regime's noise is one call's): cross maps
of the cross blocks and the self map of one block, time-averaged over the capture window as the capture's running
sums do. Two call models:
- "iid": every call shows the scene equally well (the issue's model);
- "ramp": the scene's structure grows over the run (half strength at the first call, full at the last: early
  calls see a noisier latent), so a window could prefer late calls.

Columns: mIoU against the truth (refine none, no band; the default recipe: PAMR, ignore band 0.3, kept pixels),
mean ± std over scenes, and how far the labels move from the 30-call labels of the same scene (fraction of pixels
whose label differs, default recipe). Then, for 4-call and 30-call runs under "ramp", windows of the last calls
against all calls.

    python bench/bench_few_step.py [--seeds 2] [--grid 32 32] [--regimes mmdit hard]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_mmdit_cascade import CHOSEN as CASCADE, CROSS_BLOCKS, evaluate, spread  # noqa: E402
from bench.mmdit_scenes import KINDS_MMDIT, REGIMES, arguments, attention_maps, cross_map, scenes, self_map  # noqa: E402
from seediff.schemas.config import MaskConfig  # noqa: E402
from seediff.workers.seediff import label_maps, label_pixels  # noqa: E402

CALLS = (1, 2, 4, 30)


def strength(call: int, calls: int, model: str) -> float:
    return 1.0 if model == "iid" or calls == 1 else 0.5 + 0.5 * call / (calls - 1)


def per_call_maps(layout, regime, g: torch.Generator, calls: int, model: str):
    """[calls] of (per class [blocks, h, w] cross maps, [N, N] self map)."""
    out = []
    for c in range(calls):
        s = strength(c, calls, model)
        blocks = [cross_map(layout, regime, g, strength=s) for _ in range(CROSS_BLOCKS)]
        cross = [torch.stack([b[k] for b in blocks]) for k in range(len(layout.class_ids))]
        out.append((cross, self_map(layout, regime, g, group_scale=s)))
    return out


def averaged(calls_maps, window: slice):
    chosen = calls_maps[window]
    cross = [sum(c[0][k] for c in chosen) / len(chosen) for k in range(len(chosen[0][0]))]
    return cross, sum(c[1] for c in chosen) / len(chosen)


def masks(layouts, averages, grid, px, pamr_iterations):
    """label_maps scores (none, default recipe) of per-scene averaged maps."""
    image = (grid[0] * px, grid[1] * px)
    maps = attention_maps([a[0] for a in averages], torch.stack([a[1] for a in averages]), grid, CASCADE)
    ids = [s.class_ids for s in layouts]
    plain = label_maps(maps, ids, image, MaskConfig(refine="none", ignore_band=0.0))
    recipe = label_maps(maps, ids, image, MaskConfig(pamr_iterations=pamr_iterations),
                        torch.stack([s.image for s in layouts]))
    return plain.scores, recipe.scores


def recipe_labels(layout, scores) -> np.ndarray:
    d = MaskConfig()
    k = len(layout.class_ids)
    return label_pixels(scores[None, :k], torch.tensor([layout.class_ids]), d.pamr_output_threshold, d.ignore_band,
                        d.ignore_margin)[0].numpy()


def run(regime, model, grid, px, seeds, pamr_iterations, windows: dict[int, dict[str, slice]]):
    """-> {(calls, window name): {"none": [...], "pamr": [...], "moved": [...]}}"""
    g = torch.Generator().manual_seed(1)
    layouts = scenes(regime, grid, px, seeds)
    rows: dict[tuple[int, str], dict[str, list[float]]] = {}
    for layout in layouts:
        per_calls = {n: per_call_maps(layout, regime, g, n, model) for n in CALLS}
        labels = {}
        for n in CALLS:
            for name, window in {"all": slice(None), **windows.get(n, {})}.items():
                none, pamr = masks([layout], [averaged(per_calls[n], window)], grid, px, pamr_iterations)
                row = rows.setdefault((n, name), {"none": [], "pamr": [], "pamr_band0": [], "ignore": [],
                                                  "moved": []})
                for key, values in evaluate([layout], none, pamr).items():
                    row[key] += values
                labels[n, name] = recipe_labels(layout, pamr[0])
        for key, row in rows.items():
            if len(row["moved"]) < len(row["pamr"]):
                row["moved"].append(float((labels[key] != labels[30, "all"]).mean()))
    return rows


def main() -> None:
    # 32 x 32 tokens (Flux/SD3 at 512²): 30 calls of 64² self maps per scene are slow on 2 shared cores
    args = arguments(__doc__, seeds=2, grid=(32, 32), regimes=["mmdit", "hard"])
    grid = args.grid
    windows = {4: {"last 2": slice(2, None), "last 1": slice(3, None), "first 2": slice(0, 2)},
               30: {"last 15": slice(15, None), "last 4": slice(26, None)}}
    print(f"grid {grid[1]}x{grid[0]}, cascade {list(CASCADE)}, {args.seeds} seeds x {len(KINDS_MMDIT)} kinds, {CROSS_BLOCKS} cross "
          f"blocks, PAMR {args.pamr_iterations}\n")
    print("| regime | calls model | calls averaged | window | mIoU, none | mIoU, default recipe | labels moved vs 30 "
          "calls |")
    print("|---|---|---|---|---|---|---|")
    for regime_name in args.regimes:
        for model in ("iid", "ramp"):
            rows = run(REGIMES[regime_name], model, grid, args.px, args.seeds, args.pamr_iterations,
                       windows if model == "ramp" else {})
            for (n, window), row in rows.items():
                print(f"| {regime_name} | {model} | {n} | {window} | {spread(row['none'])} | {spread(row['pamr'])} | "
                      f"{np.mean(row['moved']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
