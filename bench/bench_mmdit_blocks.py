"""How many MM-DiT blocks feed the cross maps and the self map, measured on synthetic scenes with known label maps
(bench/mmdit_scenes.py) in one run, on bench_mmdit_cascade.py's cascade.

Which real block grounds a class token cannot be decided without the real weights (none here): the peers' choices
decide that (Flux.1: ConceptAttention's last 4 double-stream blocks, GoCA's image->image of double blocks 12 and
18; SD3: Seg4Diff's block 9). What synthetic blocks can decide is how the seed map and the expansion behave when
the blocks are noisy views of one scene of unequal quality, as a real stack is:
- cross: a block either grounds (its class maps peak on the objects) or attends by position (a smooth pattern of its
  own, the same for every class; weak object signal). coarse_seed_map min-max normalises every map and sums them
  with equal weight, so a poor block dilutes the seeds as much as a good one sharpens them. Choices: the best
  block; one poor block (a single index that does not carry over to another checkpoint); the best 4; 4 of which 2
  or 3 are poor (a window around a guessed index); every block of a 57-block stack (Flux.1's count) of which a
  quarter or a half ground (an unweighted all-blocks average), the poor ones with patterns of their own or with
  one bias they share.
- self: one block that groups regions; two such blocks summed into the one sum (independent noise); one grouping
  block plus one positional block (strong locality, weak grouping); the positional block alone.

    python bench/bench_mmdit_blocks.py [--seeds 2] [--grid 32 32] [--regimes mmdit hard]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_mmdit_cascade import CHOSEN as CASCADE, evaluate, spread  # noqa: E402
from bench.mmdit_scenes import KINDS_MMDIT, REGIMES, arguments, attention_maps, cross_map, scenes, self_map  # noqa: E402
from seediff.schemas.config import MaskConfig  # noqa: E402
from seediff.workers.seediff import label_maps  # noqa: E402

POOR_STRENGTH = 0.15  # a positional block's object signal
STACK = 57  # Flux.1: 19 double + 38 single-stream blocks


def positional(grid: tuple[int, int], g: torch.Generator) -> np.ndarray:
    """A block's own smooth attention-by-position pattern in [0, 1.5]."""
    field = cv2.GaussianBlur(torch.randn(grid, generator=g).numpy(), (0, 0), max(grid) / 6)
    return 1.5 * (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def cross_blocks(layout, regime, g, good: int, poor: int, shared: bool = False) -> list[torch.Tensor]:
    """Per class [good + poor, h, w]: ``good`` grounding blocks, then ``poor`` positional ones (each its own
    pattern, or with ``shared`` one pattern for all: a bias common to the stack does not average out)."""
    blocks = [cross_map(layout, regime, g) for _ in range(good)]
    common = positional(layout.grid, g)
    blocks += [cross_map(layout, regime, g, strength=POOR_STRENGTH,
                         positional=common if shared else positional(layout.grid, g)) for _ in range(poor)]
    return [torch.stack([b[k] for b in blocks]) for k in range(len(layout.class_ids))]


CROSS_CHOICES = {  # name -> (grounding blocks, positional blocks, positional pattern shared)
    "best block (1)": (1, 0, False),
    "one block, positional (a wrong pick)": (0, 1, False),
    "best 4": (4, 0, False),
    "4, of which 2 positional": (2, 2, False),
    "4, of which 3 positional": (1, 3, False),
    f"all {STACK}, 1/4 ground": (STACK // 4, STACK - STACK // 4, False),
    f"all {STACK}, 1/4 ground, one shared positional bias": (STACK // 4, STACK - STACK // 4, True),
    f"all {STACK}, 1/2 ground": (STACK // 2, STACK - STACK // 2, False),
}


def self_choices(layout, regime, g) -> dict[str, torch.Tensor]:
    positional_regime = replace(regime, group=0.3 * regime.group, local=max(2 * regime.local, 3.0))
    first, second = self_map(layout, regime, g), self_map(layout, regime, g)
    local = self_map(layout, positional_regime, g)
    return {"one grouping block": first, "two grouping blocks summed": first + second,
            "grouping + positional block summed": first + local, "positional block alone": local}


def run(regime, grid, px, seeds, pamr_iterations) -> dict[str, dict[str, list[float]]]:
    g = torch.Generator().manual_seed(2)
    layouts = scenes(regime, grid, px, seeds)
    image = (grid[0] * px, grid[1] * px)
    rows: dict[str, dict[str, list[float]]] = {}

    def score(name, cross, selfs, batch):
        maps = attention_maps(cross, torch.stack(selfs), grid, CASCADE)
        ids = [s.class_ids for s in batch]
        plain = label_maps(maps, ids, image, MaskConfig(refine="none", ignore_band=0.0))
        recipe = label_maps(maps, ids, image, MaskConfig(pamr_iterations=pamr_iterations),
                            torch.stack([s.image for s in batch]))
        row = rows.setdefault(name, {})
        for key, values in evaluate(batch, plain.scores, recipe.scores).items():
            row.setdefault(key, []).extend(values)

    for layout in layouts:
        selfs = self_choices(layout, regime, g)
        best4 = None
        for name, (good, poor, shared) in CROSS_CHOICES.items():
            cross = cross_blocks(layout, regime, g, good, poor, shared)
            best4 = cross if name == "best 4" else best4
            score(f"cross: {name}", [cross], [selfs["one grouping block"]], [layout])
        for name, attn in selfs.items():
            score(f"self: {name}", [best4], [attn], [layout])
    return rows


def main() -> None:
    args = arguments(__doc__, seeds=2, grid=(32, 32), regimes=["mmdit", "hard"])
    grid = args.grid
    print(f"grid {grid[1]}x{grid[0]}, cascade {list(CASCADE)}, {args.seeds} seeds x {len(KINDS_MMDIT)} kinds, PAMR "
          f"{args.pamr_iterations}; cross rows use one grouping self block, self rows the best 4 cross blocks\n")
    print("| regime | blocks | mIoU, none | mIoU, default recipe | ignore |")
    print("|---|---|---|---|---|")
    for regime_name in args.regimes:
        for name, row in run(REGIMES[regime_name], grid, args.px, args.seeds, args.pamr_iterations).items():
            print(f"| {regime_name} | {name} | {spread(row['none'])} | {spread(row['pamr'])} | "
                  f"{np.mean(row['ignore']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
