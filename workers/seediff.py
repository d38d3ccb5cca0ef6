"""SeeDiff seeded mask expansion: pure, batched tensor maths on whatever device the inputs live on.

Reproduces the arithmetic of the official SeeDiff code (BAIKLAB-Admin/SeeDiff) and its paper, vectorised over the
batch:

1. coarse seed map C from the class-token cross-attention maps (variance-gated minmax, summed, minmax);
2. foreground seeds = floor(255 C^2) strictly above OpenCV's Otsu threshold;
3. expansion E = sum over seeds of the cosine similarity between self-attention rows, F = minmax(E);
4. at the middle and fine scales: P = bicubic x2 of F, background seeds = floor(255 P^2) at or below Otsu,
   G = sum of cosine similarities to the background seeds, F = minmax(minmax(1 - G) * minmax(P));
5. soft = minmax(bicubic(F -> image size)); mask = soft > threshold, or PAMR boundary refinement.

minmax of a constant map is defined as zeros (the official code divides by zero there), so degenerate inputs
give a defined, flagged result instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seediff.schemas.config import MaskConfig

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


@dataclass
class AttentionMaps:
    """Time-averaged, head-summed attention for a batch. Coarse side s, middle 2s, fine 4s."""

    cross: Sequence[torch.Tensor]  # per sample [n_maps, s, s] class-token maps (one per (layer, class sub-token))
    self_coarse: torch.Tensor  # [B, s^2, s^2], rows = queries
    self_middle: torch.Tensor  # [B, (2s)^2, (2s)^2]
    self_fine: torch.Tensor  # [B, (4s)^2, (4s)^2]


@dataclass
class MaskResult:
    soft: torch.Tensor  # [B, H, W] float32 in [0, 1]
    mask: torch.Tensor  # [B, H, W] bool final mask (PAMR-refined when config.refine == "pamr")
    stats: list[dict]  # per sample, flat JSON-able numbers
    seeds: torch.Tensor | None = field(default=None)  # [B, s, s] bool coarse foreground seeds
    unrefined: torch.Tensor | None = field(default=None)  # [B, H, W] bool soft > config.threshold


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


def coarse_seed_map(cross: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: gate each map (unbiased variance > 1e-4 -> minmax, else 0.01 * minmax), sum, minmax.

    Returns C [B, s, s] and the number of gated (near-flat) maps per sample [B]. Samples may have different map
    counts; they are zero-padded, which is exact because a zero map contributes zero."""
    n_max = max(max(len(m) for m in cross), 1)
    side = cross[0].shape[-1]
    device = cross[0].device
    maps = torch.zeros(len(cross), n_max, side, side, device=device)
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
    mu = (hist * np.arange(top)).sum(1).astype(np.float64) * scale
    mu1 = np.zeros(batch)
    q1 = np.zeros(batch)
    max_sigma = np.zeros(batch)
    max_val = np.zeros(batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(top):
            p_i = hist[:, i] * scale
            mu1 = mu1 * q1
            q1 = q1 + p_i
            q2 = 1.0 - q1
            valid = ~((np.minimum(q1, q2) < _FLT_EPSILON) | (np.maximum(q1, q2) > 1.0 - _FLT_EPSILON))
            mu1 = np.where(valid, (mu1 + bins[i] * p_i) / q1, mu1)
            mu2 = (mu - q1 * mu1) / q2
            sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
            better = valid & (sigma > max_sigma)
            max_sigma = np.where(better, sigma, max_sigma)
            max_val = np.where(better, bins[i], max_val)
    return torch.from_numpy(max_val.astype(np.int64)).to(levels.device)


def seed_affinity(attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Sum over seed rows s of cos(attn[p], attn[s]) for every row p: [B, N, N], [B, N] bool -> [B, N].

    Equals the official per-seed loop as one pair of batched matrix-vector products:
    E = diag(1/|A_p|) A (sum_s A_s / |A_s|)."""
    norms = attn.norm(dim=-1).clamp_min(COSINE_EPS)  # [B, N]
    seed_sum = torch.bmm((seeds.to(attn.dtype) / norms)[:, None, :], attn)  # [B, 1, N]
    return torch.bmm(attn, seed_sum.transpose(1, 2))[..., 0] / norms


def _refine(previous: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One background-seeded refinement step at twice the side of `previous` [B, s, s].

    Returns (F [B, 2s, 2s], Otsu thresholds [B], background-seed counts [B])."""
    batch, side = previous.shape[0], previous.shape[-1] * 2
    upsampled = bicubic(previous, (side, side))
    levels = quantise(upsampled).flatten(1)
    thresholds = otsu_thresholds(levels)
    background = levels <= thresholds[:, None]
    not_background = minmax(1 - seed_affinity(attn, background).view(batch, side, side))
    return minmax(not_background * minmax(upsampled)), thresholds, background.sum(-1)


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

    images [B, C, H, W] float 0-255; masks [B, H, W] float. The affinity is computed once; each iteration is a
    replicate pad plus 8 fused multiply-adds on shifted views. Returns [B, H, W] float32."""
    weights = _local_affinity(images.float())
    height, width = masks.shape[-2:]
    m = masks.float()[:, None]
    for _ in range(iterations):
        padded = F.pad(m, (1, 1, 1, 1), mode="replicate")[:, 0]
        out = torch.zeros_like(m[:, 0])
        for k, (dy, dx) in enumerate(_NEIGHBOURS):  # same neighbour order as the official sum over dim 2
            out.addcmul_(weights[:, k], padded[:, dy : dy + height, dx : dx + width])
        m = out[:, None]
    return m[:, 0]


def _check_shapes(maps: AttentionMaps) -> int:
    """Validate the batch; returns the coarse side s."""
    if len(maps.cross) == 0:
        raise ValueError("AttentionMaps.cross: empty batch")
    side = maps.cross[0].shape[-1]
    for b, m in enumerate(maps.cross):
        if m.dim() != 3 or m.shape[-2:] != (side, side):
            raise ValueError(f"AttentionMaps.cross[{b}]: expected [n_maps, {side}, {side}], got {list(m.shape)}")
    batch = len(maps.cross)
    for name, factor in (("self_coarse", 1), ("self_middle", 2), ("self_fine", 4)):
        n = (side * factor) ** 2
        got = getattr(maps, name)
        if tuple(got.shape) != (batch, n, n):
            raise ValueError(f"AttentionMaps.{name}: expected [{batch}, {n}, {n}], got {list(got.shape)}")
    return side


def seeded_masks(
    maps: AttentionMaps, image_size: tuple[int, int], config: MaskConfig, images: torch.Tensor | None = None
) -> MaskResult:
    """SeeDiff masks for a batch. images: [B, 3, H, W] float 0-255, required when config.refine == "pamr"."""
    side = _check_shapes(maps)
    batch = len(maps.cross)
    if config.refine == "pamr" and (images is None or tuple(images.shape) != (batch, 3, *image_size)):
        got = None if images is None else list(images.shape)
        raise ValueError(f"images: refine='pamr' needs [{batch}, 3, {image_size[0]}, {image_size[1]}], got {got}")

    coarse, gated = coarse_seed_map(maps.cross)
    levels = quantise(coarse).flatten(1)
    otsu_coarse = otsu_thresholds(levels)
    seeds = levels > otsu_coarse[:, None]
    expanded = minmax(seed_affinity(maps.self_coarse.float(), seeds).view(batch, side, side))
    middle, otsu_middle, background_middle = _refine(expanded, maps.self_middle.float())
    fine, otsu_fine, background_fine = _refine(middle, maps.self_fine.float())
    soft = minmax(bicubic(fine, tuple(image_size)))

    unrefined = soft > config.threshold
    if config.refine == "pamr":
        refined = pamr(images, (soft > config.pamr_input_threshold).float(), config.pamr_iterations)
        mask = minmax(refined) > config.pamr_output_threshold
    else:
        mask = unrefined

    per_sample = {
        "num_cross_maps": torch.tensor([len(m) for m in maps.cross]),
        "gated_maps": gated,
        "num_seeds": seeds.sum(-1),
        "seed_fraction": seeds.float().mean(-1),
        "otsu_coarse": otsu_coarse,
        "otsu_middle": otsu_middle,
        "otsu_fine": otsu_fine,
        "background_seeds_middle": background_middle,
        "background_seeds_fine": background_fine,
        "unrefined_foreground_fraction": unrefined.flatten(1).float().mean(-1),
        "foreground_fraction": mask.flatten(1).float().mean(-1),
        "soft_contrast": _contrast(soft, mask),
        "empty": ~mask.flatten(1).any(-1),
        "degenerate": (coarse.flatten(1).amax(-1) == 0) | (seeds.sum(-1) == 0) | seeds.all(-1),
    }
    columns = {k: v.cpu().tolist() for k, v in per_sample.items()}
    stats = [{k: _plain(v[b]) for k, v in columns.items()} for b in range(batch)]
    return MaskResult(soft=soft, mask=mask, stats=stats, seeds=seeds.view(batch, side, side), unrefined=unrefined)


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
