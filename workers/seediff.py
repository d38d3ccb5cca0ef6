"""SeeDiff seeded mask expansion: pure, batched tensor maths on whatever device the inputs live on.

Reproduces the arithmetic of the official SeeDiff code (BAIKLAB-Admin/SeeDiff) and its paper, vectorised over the
batch:

1. coarse seed map C from the class-token cross-attention maps (variance-gated minmax, summed, minmax);
2. foreground seeds = floor(255 C^2) strictly above OpenCV's Otsu threshold;
3. expansion E = sum over seeds of the cosine similarity between self-attention rows, F = minmax(E);
4. at each finer side of the cascade (SD 1.x/2.x: middle and fine; SDXL: one): P = bicubic x2 of F, background
   seeds = floor(255 P^2) at or below Otsu, G = sum of cosine similarities to the background seeds,
   F = minmax(minmax(1 - G) * minmax(P));
5. soft = minmax(bicubic(F -> image size)); mask = soft > threshold, or PAMR boundary refinement.

Grids may be h x w. A self-attention row may hold its keys summed in blocks (fewer keys than queries, see
workers/capture.py): cosines between rows need only the rows to share their key layout. A model with one attention
grid (an MM-DiT) gets the coarser sides of its cascade by pooling the maps captured there (``pool_cross``,
``pool_self``; bench/bench_mmdit_cascade.py chose the sides).

Several classes per image (``label_maps``) run the same cascade: each class seeds from its own cross-attention maps,
and its seed set expands over the sample's shared self-attention as one more row of the same batched products
(``seed_affinity`` takes [B, K, N] seed sets). One label per pixel then comes from ``label_pixels``. ``seeded_masks``
is the one-class case and keeps the official arithmetic.

minmax of a constant map is defined as zeros (the official code divides by zero there), so degenerate inputs
give a defined, flagged result instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seediff.schemas.config import MaskConfig
from seediff.schemas.records import IGNORE_LABEL as IGNORE

# The official per-layer gate: maps whose unbiased variance is not above this are scaled by GATE_WEIGHT.
VARIANCE_GATE = 1e-4
GATE_WEIGHT = 0.01
# torch.nn.CosineSimilarity's default eps, used by the official expansion loop.
COSINE_EPS = 1e-8
# The official code stores floor(255 x^2) in a uint16 image before Otsu.
UINT16_MAX = 65535
# PAMR (Araslanov & Roth 2020) as configured by SeeDiff: 3x3 window, dilation 1, temperature 0.2 * local std.
PAMR_TEMPERATURE = 0.2
PAMR_EPS = 1e-8
_FLT_EPSILON = float(np.finfo(np.float32).eps)
# The 8 neighbours of the 3x3 window in OpenCV/PAMR kernel order (row-major, centre excluded).
_NEIGHBOURS = tuple((dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1))


class AttentionMaps:
    """Time-averaged, head-summed attention for a batch. Coarse grid h x w; each further side of the cascade doubles
    it (SD1.x at 512 px: 16, 32, 64; SDXL at 1024 px: 32, 64).

    ``cross[b]``: for ``label_maps`` a list with one [n_maps, h, w] tensor per class of sample b (one map per
    (layer, class sub-token)); for ``seeded_masks`` the one class's [n_maps, h, w] tensor itself.
    ``self_attn``: per side, coarse first, [B, (2^i h)(2^i w), keys], rows = queries. The sides may also be given
    by name, coarse → middle → fine (``self_coarse=, self_middle=, self_fine=``: the API callers of the SD 1.x
    three-side cascade use); a shorter cascade leaves the last names unset."""

    def __init__(
        self,
        cross: Sequence[torch.Tensor | Sequence[torch.Tensor]],
        self_attn: Sequence[torch.Tensor] | None = None,
        *,
        self_coarse: torch.Tensor | None = None,
        self_middle: torch.Tensor | None = None,
        self_fine: torch.Tensor | None = None,
    ):
        named = [t for t in (self_coarse, self_middle, self_fine) if t is not None]
        if (self_attn is None) == (not named):
            raise TypeError("AttentionMaps: give the sides either as self_attn or as self_coarse/self_middle/self_fine")
        self.cross = cross
        self.self_attn = list(self_attn) if self_attn is not None else named

    def _side(self, index: int) -> torch.Tensor | None:
        return self.self_attn[index] if index < len(self.self_attn) else None

    self_coarse = property(lambda self: self._side(0))
    self_middle = property(lambda self: self._side(1))
    self_fine = property(lambda self: self._side(2))


@dataclass
class MaskResult:
    soft: torch.Tensor  # [B, H, W] float32 in [0, 1]
    mask: torch.Tensor  # [B, H, W] bool final mask (PAMR-refined when config.refine == "pamr")
    stats: list[dict]  # per sample, flat JSON-able numbers
    seeds: torch.Tensor | None = field(default=None)  # [B, h, w] bool coarse foreground seeds
    unrefined: torch.Tensor | None = field(default=None)  # [B, H, W] bool soft > config.threshold


@dataclass
class LabelMaps:
    labels: torch.Tensor  # [B, H, W] uint8: 0 background, a class id, IGNORE
    scores: torch.Tensor  # [B, K, H, W] float per-class maps the labels come from (K = most classes; missing: 0)
    stats: list[dict]  # per sample: flat numbers plus "classes", one dict per class in class_ids order


def minmax(x: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """(x - min) / (max - min) over the last `dims` dimensions; a constant map becomes zeros."""
    flat = x.flatten(-dims)
    lo = flat.amin(-1).view(*x.shape[:-dims], *([1] * dims))
    hi = flat.amax(-1).view(*x.shape[:-dims], *([1] * dims))
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W]; a = -0.75, half-pixel centres, edge replication, no clipping (= cv2 INTER_CUBIC)."""
    return F.interpolate(x[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]


def pool_cross(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """Cross-attention maps of a coarser cascade side from maps at a model's single grid (MM-DiT): [..., h, w] ->
    [..., h/f, w/f], each f x f block of query cells averaged (keeps the maps' scale, which the variance gate reads)."""
    *lead, h, w = maps.shape
    if h % factor or w % factor:
        raise ValueError(f"pool_cross: factor {factor} does not divide the grid {h}x{w}")
    return maps.reshape(*lead, h // factor, factor, w // factor, factor).mean((-3, -1))


def pool_self(attn: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Self-attention of a coarser cascade side from rows captured at a model's single grid (MM-DiT):
    [B, h*w, keys] -> [B, (h/f)(w/f), (h/f)(w/f)], each f x f block of query rows averaged and the keys summed in
    f x f blocks, so a coarse row is its cells' mean row over the coarse cells (SeeDiff's cosines need rows that
    share one key layout, not stochastic rows). Keys already summed in g x g blocks (the capture's key pool, g
    dividing f) are summed in (f/g) x (f/g) blocks; f = 1 returns the rows as they are. Linear, so it commutes with
    the capture's time average."""
    h, w = grid
    batch, queries, keys = attn.shape
    g = math.isqrt(queries // keys) if keys and queries % keys == 0 else 0
    if factor == 1 and queries == h * w:
        return attn
    if queries != h * w or h % factor or w % factor or g == 0 or g * g * keys != queries or factor % g:
        raise ValueError(f"pool_self: cannot pool [{batch}, {queries}, {keys}] on a {h}x{w} grid by {factor}")
    rows = attn.reshape(batch, h // factor, factor, w // factor, factor, keys).mean((2, 4))
    k = factor // g
    rows = rows.reshape(batch, -1, h // factor, k, w // factor, k).sum((3, 5))
    return rows.reshape(batch, (h // factor) * (w // factor), -1)


def coarse_seed_map(cross: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: gate each map (unbiased variance > 1e-4 -> minmax, else 0.01 * minmax), sum, minmax.

    Returns C [B, h, w] and the number of gated (near-flat) maps per sample [B]. Samples may have different map
    counts; they are zero-padded, which is exact because a zero map contributes zero."""
    n_max = max(max(len(m) for m in cross), 1)
    grid = cross[0].shape[-2:]
    device = cross[0].device
    maps = torch.zeros(len(cross), n_max, *grid, device=device)
    present = torch.zeros(len(cross), n_max, dtype=torch.bool, device=device)
    for b, m in enumerate(cross):
        maps[b, : len(m)] = m.float()
        present[b, : len(m)] = True
    var = maps.flatten(-2).var(-1)  # unbiased, as the official torch .var()
    weight = torch.where(var > VARIANCE_GATE, 1.0, GATE_WEIGHT)
    gated = minmax(maps) * weight[..., None, None]
    total = torch.zeros_like(maps[:, 0])
    for layer in range(n_max):  # sequential like torch.sum over the official [L, s, s] stack; padding adds 0
        total = total + gated[:, layer]
    return minmax(total), ((var <= VARIANCE_GATE) & present).sum(-1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """floor(255 * x^2) as int64, as the official code's (x*x*255).astype(uint16) (values are >= 0)."""
    return ((x * x) * 255).clamp(max=UINT16_MAX).floor().long()


def otsu_thresholds(levels: torch.Tensor) -> torch.Tensor:
    """OpenCV's Otsu threshold (16-bit path, identical to the 8-bit one) per row of non-negative integers.

    levels: [B, N] int64. Returns [B] int64 thresholds t; OpenCV's foreground is levels > t. The histogram is built on
    the device; the scan replays OpenCV's float64 recurrence operation by operation (vectorised over the batch), so
    ties and near-ties resolve exactly as cv2.threshold(..., THRESH_OTSU) does. A single-valued input gives 0."""
    batch, n = levels.shape
    top = int(levels.max()) + 1 if levels.numel() else 1
    offsets = torch.arange(batch, device=levels.device)[:, None] * top
    hist = torch.bincount((levels + offsets).flatten(), minlength=batch * top).view(batch, top).cpu().numpy()
    scale = 1.0 / n
    bins = np.arange(top, dtype=np.float64)
    # OpenCV sums i * h[i] in float64 bin by bin; every partial sum is an integer below 2^53, so this is exact.
    mu = (hist * np.arange(top)).sum(1).astype(np.float64)[:, None] * scale
    # Everything but mu1 is elementwise or a running sum (np.cumsum adds in order, as OpenCV's q1 += p_i does), so
    # only mu1's recurrence runs bin by bin: [bins, batch] columns, each step's operands contiguous.
    p = (hist * scale).T
    q1 = np.cumsum(p, axis=0)
    q1_before = np.concatenate([np.zeros((1, batch)), q1[:-1]])
    q2 = 1.0 - q1
    valid = ~((np.minimum(q1, q2) < _FLT_EPSILON) | (np.maximum(q1, q2) > 1.0 - _FLT_EPSILON))
    weighted = bins[:, None] * p
    mu1 = np.empty_like(p)
    running = np.zeros(batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(top):  # OpenCV: mu1 *= q1; q1 += p_i; if valid: mu1 = (mu1 + i * p_i) / q1
            running = running * q1_before[i]
            running = np.where(valid[i], (running + weighted[i]) / q1[i], running)
            mu1[i] = running
        mu2 = (mu.T - q1 * mu1) / q2
        sigma = np.where(valid, q1 * q2 * (mu1 - mu2) * (mu1 - mu2), 0.0)
    # OpenCV keeps the first bin whose sigma beats every earlier one (and 0): argmax's first maximum, or bin 0
    best = sigma.argmax(0)
    max_val = np.where(sigma[best, np.arange(batch)] > 0, best, 0)
    return torch.from_numpy(max_val.astype(np.int64)).to(levels.device)


def seed_affinity(attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Sum over seed rows s of cos(attn[p], attn[s]) for every row p, for K seed sets sharing one self-attention:
    [B, N, N], [B, K, N] bool -> [B, K, N].

    Equals the official per-seed loop as one pair of batched matrix products (matrix-vector for K = 1):
    E = diag(1/|A_p|) A (sum_s A_s / |A_s|)."""
    norms = attn.norm(dim=-1).clamp_min(COSINE_EPS)  # [B, N]
    seed_sum = torch.bmm(seeds.to(attn.dtype) / norms[:, None, :], attn)  # [B, K, N]
    return (torch.bmm(attn, seed_sum.transpose(1, 2)) / norms[..., None]).transpose(1, 2)


def _refine(
    previous: torch.Tensor, attn: torch.Tensor, classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One background-seeded refinement step at twice the grid of `previous` [B*K, h, w] (K = ``classes`` seed sets
    per sample of ``attn``).

    Returns (F [B*K, 2h, 2w], Otsu thresholds [B*K], background-seed counts [B*K])."""
    entries, grid = previous.shape[0], (previous.shape[-2] * 2, previous.shape[-1] * 2)
    upsampled = bicubic(previous, grid)
    levels = quantise(upsampled).flatten(1)
    thresholds = otsu_thresholds(levels)
    background = levels <= thresholds[:, None]
    affinity = seed_affinity(attn, background.view(-1, classes, grid[0] * grid[1])).reshape(entries, *grid)
    return minmax(minmax(1 - affinity) * minmax(upsampled)), thresholds, background.sum(-1)


def _local_affinity(images: torch.Tensor) -> torch.Tensor:
    """PAMR neighbour weights [B, 8, H, W] from images [B, C, H, W] (float 0-255, replicate padding)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    window = torch.stack(
        [padded[..., dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], dim=2
    )  # [B, C, 9, H, W]
    local_std = window.std(dim=2, keepdim=True)  # unbiased, as the official x.std(2)
    neighbours = window[:, :, [dy * 3 + dx for dy, dx in _NEIGHBOURS]]
    affinity = -(images[:, :, None] - neighbours).abs() / (PAMR_EPS + PAMR_TEMPERATURE * local_std)
    return affinity.mean(1).softmax(1)


def pamr(images: torch.Tensor, masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """Pixel-adaptive mask refinement: iterate m(p) <- sum_n w_pn m(n) over the 8 neighbours.

    images [B, C, H, W] float 0-255; masks [B, H, W] float, or [B, K, H, W] for K maps per image that propagate
    jointly with the image's affinities. The affinity is computed once; each iteration is a replicate pad plus 8
    fused multiply-adds on shifted views. Returns masks' shape, float32."""
    weights = _local_affinity(images.float())
    if masks.dim() == 4:
        channels = masks.shape[1]
        refined = pamr_with(weights.repeat_interleave(channels, 0), masks.flatten(0, 1), iterations)
        return refined.view(masks.shape)
    return pamr_with(weights, masks, iterations)


def pamr_with(weights: torch.Tensor, masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """PAMR iterations with precomputed neighbour weights [B, 8, H, W] on masks [B, H, W]."""
    height, width = masks.shape[-2:]
    m = masks.float()[:, None]
    for _ in range(iterations):
        padded = F.pad(m, (1, 1, 1, 1), mode="replicate")[:, 0]
        out = torch.zeros_like(m[:, 0])
        for k, (dy, dx) in enumerate(_NEIGHBOURS):  # same neighbour order as the official sum over dim 2
            out.addcmul_(weights[:, k], padded[:, dy : dy + height, dx : dx + width])
        m = out[:, None]
    return m[:, 0]


def _check_shapes(maps: AttentionMaps, entries: Sequence[tuple[str, torch.Tensor]]) -> tuple[int, int]:
    """Validate the batch; ``entries`` are the (name, cross maps) seed sources. Returns the coarse grid (h, w)."""
    if len(maps.cross) == 0:
        raise ValueError("AttentionMaps.cross: empty batch")
    grid = tuple(entries[0][1].shape[-2:])
    for name, m in entries:
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or tuple(m.shape[-2:]) != grid:
            got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"AttentionMaps.{name}: expected [n_maps, {grid[0]}, {grid[1]}], got {got}")
    if not maps.self_attn:
        raise ValueError("AttentionMaps.self_attn: no sides")
    batch = len(maps.cross)
    for i, got in enumerate(maps.self_attn):
        n = grid[0] * grid[1] * 4**i
        if got.dim() != 3 or tuple(got.shape[:2]) != (batch, n) or not 0 < got.shape[2] <= n:
            raise ValueError(f"AttentionMaps.self_attn[{i}]: expected [{batch}, {n}, <= {n} keys], got {list(got.shape)}")
    return grid


def _refinement_names(count: int) -> list[str]:
    """Stat names of the refinement sides: the last is "fine", the one before "middle" (SD1.x's names)."""
    if count <= 2:
        return ["middle", "fine"][2 - count :]
    return [f"middle{i + 1}" for i in range(count - 1)] + ["fine"]


@dataclass
class _Cascade:
    """The cascade over B samples x K seed sets, every tensor with the batch as B*K rows, sample-major."""

    soft: torch.Tensor  # [B*K, H, W]
    coarse: torch.Tensor  # [B*K, h, w]
    seeds: torch.Tensor  # [B*K, h*w] bool
    stats: dict[str, torch.Tensor]  # name -> [B*K]


def _cascade(
    maps: AttentionMaps, cross: Sequence[torch.Tensor], classes: int, image_size: tuple[int, int]
) -> _Cascade:
    """Seeds of every cross entry (``classes`` per sample, sample-major), expanded over their sample's shared
    self-attention side by side (SD1.x at 512 px: 16 -> 32 -> 64), upsampled to the image."""
    grid = tuple(cross[0].shape[-2:])
    coarse, gated = coarse_seed_map(cross)
    levels = quantise(coarse).flatten(1)
    otsu_coarse = otsu_thresholds(levels)
    seeds = levels > otsu_coarse[:, None]
    affinity = seed_affinity(maps.self_attn[0].float(), seeds.view(-1, classes, grid[0] * grid[1]))
    current = minmax(affinity.reshape(len(cross), *grid))
    refinements = {}
    for name, attn in zip(_refinement_names(len(maps.self_attn) - 1), maps.self_attn[1:]):
        current, otsu, background = _refine(current, attn.float(), classes)
        refinements[f"otsu_{name}"], refinements[f"background_seeds_{name}"] = otsu, background
    stats = {
        "num_cross_maps": torch.tensor([len(m) for m in cross]),
        "gated_maps": gated,
        "num_seeds": seeds.sum(-1),
        "seed_fraction": seeds.float().mean(-1),
        "otsu_coarse": otsu_coarse,
        **refinements,
        "degenerate": (coarse.flatten(1).amax(-1) == 0) | (seeds.sum(-1) == 0) | seeds.all(-1),
    }
    return _Cascade(minmax(bicubic(current, tuple(image_size))), coarse, seeds, stats)


def _check_images(images: torch.Tensor | None, batch: int, image_size: tuple[int, int], config: MaskConfig) -> None:
    if config.refine == "pamr" and (images is None or tuple(images.shape) != (batch, 3, *image_size)):
        got = None if images is None else list(images.shape)
        raise ValueError(f"images: refine='pamr' needs [{batch}, 3, {image_size[0]}, {image_size[1]}], got {got}")


def seeded_masks(
    maps: AttentionMaps, image_size: tuple[int, int], config: MaskConfig, images: torch.Tensor | None = None
) -> MaskResult:
    """SeeDiff masks for a batch, one class per sample. images: [B, 3, H, W] float 0-255, required when
    config.refine == "pamr"."""
    grid = _check_shapes(maps, [(f"cross[{b}]", m) for b, m in enumerate(maps.cross)])
    batch = len(maps.cross)
    _check_images(images, batch, image_size, config)
    cascade = _cascade(maps, list(maps.cross), 1, image_size)
    soft, seeds = cascade.soft, cascade.seeds

    unrefined = soft > config.threshold
    if config.refine == "pamr":
        refined = pamr(images, (soft > config.pamr_input_threshold).float(), config.pamr_iterations)
        mask = minmax(refined) > config.pamr_output_threshold
    else:
        mask = unrefined

    per_sample = {
        **cascade.stats,
        "unrefined_foreground_fraction": unrefined.flatten(1).float().mean(-1),
        "foreground_fraction": mask.flatten(1).float().mean(-1),
        "soft_contrast": _contrast(soft, mask),
        "empty": ~mask.flatten(1).any(-1),
    }
    columns = {k: v.cpu().tolist() for k, v in per_sample.items()}
    stats = [{k: _plain(v[b]) for k, v in columns.items()} for b in range(batch)]
    return MaskResult(soft=soft, mask=mask, stats=stats, seeds=seeds.view(batch, *grid), unrefined=unrefined)


def label_maps(
    maps: AttentionMaps,
    class_ids: Sequence[Sequence[int]],
    image_size: tuple[int, int],
    config: MaskConfig,
    images: torch.Tensor | None = None,
) -> LabelMaps:
    """One label per pixel for samples with one or more classes. ``maps.cross[b][k]`` are the cross-attention maps of
    class ``class_ids[b][k]`` (all its sub-tokens and occurrences). Each class gets its SeeDiff soft map from the
    shared cascade; with PAMR on, the class maps (binarised at ``pamr_input_threshold``) propagate jointly over the
    image's affinities and are min-max normalised; then ``label_pixels`` with the threshold of the refine mode.
    With one class and ``ignore_band = 0`` the labels are ``class_id * seeded_masks(...).mask``."""
    batch = len(maps.cross)
    if len(class_ids) != batch or any(len(ids) != len(m) or not ids for ids, m in zip(class_ids, maps.cross)):
        raise ValueError(f"class_ids: expected one non-empty list per sample matching AttentionMaps.cross, got "
                         f"{[len(i) for i in class_ids]} ids for {[len(m) for m in maps.cross]} classes")
    if any(not 1 <= i < IGNORE for ids in class_ids for i in ids):
        raise ValueError(f"class_ids: ids must lie in 1..{IGNORE - 1}, got {class_ids}")
    entries = [(f"cross[{b}][{k}]", m) for b, per_class in enumerate(maps.cross) for k, m in enumerate(per_class)]
    grid = _check_shapes(maps, entries)
    _check_images(images, batch, image_size, config)
    classes = max(len(ids) for ids in class_ids)
    device = entries[0][1].device
    absent = torch.zeros(0, *grid, device=device)  # a class slot the sample does not use: no maps, no seeds
    cross = [per_class[k] if k < len(per_class) else absent for per_class in maps.cross for k in range(classes)]
    present = torch.tensor([[k < len(ids) for k in range(classes)] for ids in class_ids], device=device)
    ids = torch.tensor([list(ids) + [0] * (classes - len(ids)) for ids in class_ids], device=device)

    cascade = _cascade(maps, cross, classes, image_size)
    soft = cascade.soft.view(batch, classes, *image_size)
    if config.refine == "pamr":
        refined = pamr(images, (soft > config.pamr_input_threshold).float(), config.pamr_iterations)
        scores, threshold = minmax(refined), config.pamr_output_threshold
    else:
        scores, threshold = soft, config.threshold
    scores = scores * present[..., None, None]
    labels = label_pixels(scores, ids, threshold, config.ignore_band, config.ignore_margin)
    return LabelMaps(labels, scores, _label_stats(labels, scores, ids, present, cascade.stats))


def label_pixels(
    scores: torch.Tensor, class_ids: torch.Tensor, threshold: float, band: float, margin: float
) -> torch.Tensor:
    """The labelling rule. scores [B, K, H, W] in [0, 1], class_ids [B, K] -> uint8 labels [B, H, W]:
    background where every class scores at most ``threshold - band``; ignore where the best score lies in the band
    (threshold - band, threshold], or where a second class also scores above ``threshold`` within ``margin`` of the
    best; else the best class's id (the first on ties). band = 0 and one class: ``class_id * (score > threshold)``.
    The band sits below the threshold because the cascade under-segments: the pixels just below it are mostly the
    object's rim (bench/bench_scenes.py)."""
    top = scores.topk(min(2, scores.shape[1]), dim=1)
    best = top.values[:, 0]
    winner = class_ids.gather(1, top.indices[:, 0].flatten(1)).view_as(best)
    labels = torch.where(best > threshold, winner, torch.zeros_like(winner))
    uncertain = (best > threshold - band) & (best <= threshold)
    if scores.shape[1] > 1:
        second = top.values[:, 1]
        uncertain |= (second > threshold) & (best - second < margin)
    return torch.where(uncertain, IGNORE, labels).to(torch.uint8)


def _label_stats(
    labels: torch.Tensor,
    scores: torch.Tensor,
    ids: torch.Tensor,
    present: torch.Tensor,
    cascade: dict[str, torch.Tensor],
) -> list[dict]:
    """Per sample: ignore / foreground fractions, empty (no class pixel), degenerate (some class without usable
    seeds), confidence (the weakest class's contrast), and per class its cascade numbers, pixel fraction and
    contrast (mean score on its pixels minus elsewhere)."""
    batch, classes = ids.shape
    flat = labels.flatten(1)
    own = flat[:, None, :] == ids[..., None].to(flat.dtype)  # [B, K, HW]
    pixel_fraction = own.float().mean(-1)
    contrast = _contrast(scores.flatten(0, 1), own.flatten(0, 1)).view(batch, classes)
    per_class = {**{k: v.view(batch, classes) for k, v in cascade.items()}, "pixel_fraction": pixel_fraction,
                 "score": contrast}
    columns = {k: v.cpu().tolist() for k, v in per_class.items()}
    present_rows = present.cpu().tolist()
    ignore = (flat == IGNORE).float().mean(-1).cpu().tolist()
    foreground = ((flat != 0) & (flat != IGNORE)).float().mean(-1).cpu().tolist()
    stats = []
    for b in range(batch):
        used = [k for k in range(classes) if present_rows[b][k]]
        entries = [{"class_id": int(ids[b, k]), **{n: _plain(v[b][k]) for n, v in columns.items()}} for k in used]
        stats.append({
            "foreground_fraction": foreground[b],
            "ignore_fraction": ignore[b],
            "empty": not any(e["pixel_fraction"] > 0 for e in entries),
            "degenerate": any(e["degenerate"] for e in entries),
            "confidence": min(e["score"] for e in entries),
            "classes": entries,
        })
    return stats


def _contrast(soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Confidence score: mean soft value inside the mask minus outside (0 when either side is empty)."""
    inside, outside = mask.flatten(1), ~mask.flatten(1)
    flat = soft.flatten(1)
    n_in, n_out = inside.sum(-1), outside.sum(-1)
    mean_in = (flat * inside).sum(-1) / n_in.clamp_min(1)
    mean_out = (flat * outside).sum(-1) / n_out.clamp_min(1)
    return torch.where((n_in > 0) & (n_out > 0), mean_in - mean_out, torch.zeros_like(mean_in))


def _plain(value: bool | int | float) -> int | float:
    return int(value) if isinstance(value, bool) else value
