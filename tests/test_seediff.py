"""SeeDiff mask algorithm: exactness against OpenCV and a loop-structured reference of the official code, recovery of
known objects from synthetic attention, PAMR behaviour, and degenerate inputs."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seediff.schemas.config import MaskConfig
from seediff.workers.seediff import (
    AttentionMaps,
    bicubic,
    coarse_seed_map,
    minmax,
    otsu_thresholds,
    pamr,
    pool_cross,
    pool_self,
    seeded_masks,
)

SIDE = 8  # coarse side; middle 16, fine 32
IMAGE = 64
NO_REFINE = MaskConfig(refine="none")


# ---------------------------------------------------------------- synthetic scenes


def object_mask(kind: str, cy: float, cx: float, r: float, size: int = IMAGE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if kind == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if kind == "bar":
        return (np.abs(yy - cy) <= r * 0.6) & (np.abs(xx - cx) <= r * 1.6)
    raise ValueError(kind)


def cells(mask: np.ndarray, side: int) -> np.ndarray:
    """Object label per attention cell: more than half of the cell's pixels are object."""
    return cv2.resize(mask.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA).ravel() > 0.5


def self_attention(labels: np.ndarray, rng: np.random.Generator, heads: int = 8) -> np.ndarray:
    """Head-summed attention where cells attend mostly to cells of their own region, plus noise."""
    same = labels[:, None] == labels[None, :]
    logits = np.where(same, 3.0, 0.0) + rng.normal(0, 0.3, same.shape)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return (heads * probs).astype(np.float32)


def cross_attention(labels: np.ndarray, rng: np.random.Generator, layers: int = 5) -> np.ndarray:
    """Class-token maps peaked on the object (blurry, noisy), plus one near-flat layer."""
    obj = labels.reshape(SIDE, SIDE).astype(np.float32)
    maps = [cv2.GaussianBlur(obj, (3, 3), 0.8) * rng.uniform(0.5, 1.5) + rng.uniform(0, 0.15, obj.shape)
            for _ in range(layers - 1)]
    maps.append(np.full(obj.shape, 0.02, np.float32) + rng.uniform(0, 1e-3, obj.shape))
    return np.stack(maps).astype(np.float32)


def scene(kind: str, cy: float, cx: float, r: float, seed: int):
    rng = np.random.default_rng(seed)
    mask = object_mask(kind, cy, cx, r)
    maps = {
        "cross": torch.from_numpy(cross_attention(cells(mask, SIDE), rng)),
        "self_coarse": torch.from_numpy(self_attention(cells(mask, SIDE), rng)),
        "self_middle": torch.from_numpy(self_attention(cells(mask, 2 * SIDE), rng)),
        "self_fine": torch.from_numpy(self_attention(cells(mask, 4 * SIDE), rng)),
    }
    colour = np.where(mask[None], np.array([200, 60, 50])[:, None, None], np.array([40, 120, 210])[:, None, None])
    image = np.clip(colour + rng.normal(0, 6, colour.shape), 0, 255).astype(np.float32)
    return mask, maps, torch.from_numpy(image)


def batch_of(scenes) -> tuple[AttentionMaps, torch.Tensor]:
    maps = AttentionMaps(
        cross=[s[1]["cross"] for s in scenes],
        self_attn=[torch.stack([s[1][name] for s in scenes]) for name in ("self_coarse", "self_middle", "self_fine")],
    )
    return maps, torch.stack([s[2] for s in scenes])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


SCENES = [("disc", 32, 32, 22, 0), ("disc", 30, 34, 20, 1), ("square", 30, 30, 18, 2), ("bar", 32, 30, 17, 3),
          ("square", 28, 36, 20, 4), ("disc", 34, 28, 24, 5)]


# ---------------------------------------------------------------- exactness of the building blocks


@pytest.mark.parametrize("src,dst", [((8, 8), (16, 16)), ((16, 16), (32, 32)), ((32, 32), (64, 64)), ((5, 7), (24, 40))])
def test_bicubic_equals_opencv_inter_cubic(src, dst):
    x = np.random.default_rng(0).normal(size=src).astype(np.float32)  # signed: exercises overshoot and borders
    ours = bicubic(torch.from_numpy(x)[None], dst)[0].numpy()
    theirs = cv2.resize(x, dst[::-1], interpolation=cv2.INTER_CUBIC)
    # same kernel and borders; float32 coefficient rounding differs in the last bits (1e-5 on unit-variance data)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def otsu_cv2(values: np.ndarray) -> tuple[float, np.ndarray]:
    t, out = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return t, out.ravel() > 0


def between_class_variance(values: np.ndarray, t: int) -> float:
    low, high = values[values <= t].astype(np.float64), values[values > t].astype(np.float64)
    if len(low) == 0 or len(high) == 0:
        return 0.0
    return len(low) * len(high) * (low.mean() - high.mean()) ** 2 / len(values) ** 2


@pytest.mark.parametrize("dtype,top", [(np.uint8, 4), (np.uint8, 256), (np.uint16, 3), (np.uint16, 450)])
def test_otsu_equals_opencv(dtype, top):
    rng = np.random.default_rng(top)
    rows = [rng.integers(0, top, size=int(rng.integers(2, 300))).astype(dtype) for _ in range(60)]
    rows += [np.array([0, 1, 2] * 3, dtype), np.full(9, 7, dtype), np.zeros(9, dtype)]  # exact tie, flat, zeros
    for values in rows:
        ours = int(otsu_thresholds(torch.from_numpy(values.astype(np.int64))[None])[0])
        t, foreground = otsu_cv2(values)
        assert ours == t, values
        assert np.array_equal(values > ours, foreground)


def test_otsu_maximises_between_class_variance_above_255():
    rng = np.random.default_rng(7)
    batch = np.stack([rng.integers(0, 420, 1024) for _ in range(6)])  # one call, a batch of rows
    thresholds = otsu_thresholds(torch.from_numpy(batch)).numpy()
    for values, t in zip(batch, thresholds):
        best = max(between_class_variance(values, c) for c in range(values.max()))
        assert between_class_variance(values, int(t)) == pytest.approx(best, rel=1e-12)


# ---------------------------------------------------------------- the official code's loop structure, as reference


def ref_minmax(x):
    return (x - x.min()) / (x.max() - x.min())


def ref_otsu(x):
    levels = (x * x * 255).astype(np.uint16)
    _, out = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return out.ravel() > 0


def ref_cosine_sum(attn, rows):
    total = np.zeros(attn.shape[0], np.float32)
    norms = np.linalg.norm(attn, axis=1)
    for idx in np.flatnonzero(rows):  # one seed at a time, as the official code
        total = total + attn @ attn[idx] / np.maximum(norms * norms[idx], 1e-8)
    return total


def reference_soft(cross, sa_coarse, *finer, size):
    """The official loop structure over any number of finer sides (SD1.x: middle and fine; SDXL: one) and h x w
    grids."""
    h, w = cross.shape[-2:]
    gated = [ref_minmax(m) if m.var(ddof=1) > 1e-4 else ref_minmax(m) * 0.01 for m in cross]
    coarse = ref_minmax(np.sum(np.stack(gated), axis=0))
    seeds = ref_otsu(coarse)
    current = ref_minmax(ref_cosine_sum(sa_coarse, seeds).reshape(h, w))
    for attn in finer:
        h, w = 2 * h, 2 * w
        up = cv2.resize(current, (w, h), interpolation=cv2.INTER_CUBIC)
        background = ~ref_otsu(up)
        not_background = ref_minmax(1 - ref_cosine_sum(attn, background).reshape(h, w))
        current = ref_minmax(ref_minmax(up) * not_background)
    return ref_minmax(cv2.resize(current, size[::-1], interpolation=cv2.INTER_CUBIC)), seeds


def random_maps(rng, batch, layers=(5, 7, 6)):
    def attn(n):
        logits = rng.normal(0, 2, (batch, n, n)).astype(np.float32)
        return torch.from_numpy(8 * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))

    cross = [torch.from_numpy(rng.gamma(2.0, 1.0, (layers[b % len(layers)], SIDE, SIDE)).astype(np.float32))
             for b in range(batch)]
    return AttentionMaps(cross, [attn(SIDE**2), attn((2 * SIDE) ** 2), attn((4 * SIDE) ** 2)])


def test_matches_loop_reference_on_random_inputs():
    maps = random_maps(np.random.default_rng(11), batch=3)
    size = (48, 80)
    result = seeded_masks(maps, size, NO_REFINE)
    for b in range(3):
        soft, seeds = reference_soft(maps.cross[b].numpy(), *(a[b].numpy() for a in maps.self_attn), size=size)
        assert np.array_equal(result.seeds[b].numpy().ravel(), seeds)
        np.testing.assert_allclose(result.soft[b].numpy(), soft, rtol=0, atol=2e-5)
        assert np.array_equal(result.mask[b].numpy(), soft > 0.5)


@pytest.mark.parametrize("grid,sides", [((4, 6), 3), ((6, 4), 2), ((8, 8), 2)], ids=["3-sides-h<w", "2-sides-h>w", "2-sides"])
def test_any_cascade_and_aspect_matches_loop_reference(grid, sides):
    """SDXL's two-side cascade and non-square grids: the same official arithmetic, side by side."""
    rng = np.random.default_rng(3)
    h, w = grid

    def attn(n):
        logits = rng.normal(0, 2, (2, n, n)).astype(np.float32)
        return torch.from_numpy(8 * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))

    cross = [torch.from_numpy(rng.gamma(2.0, 1.0, (k, h, w)).astype(np.float32)) for k in (5, 3)]
    maps = AttentionMaps(cross, [attn(h * w * 4**i) for i in range(sides)])
    size = (h * 2 ** (sides + 1), w * 2 ** (sides + 1))
    result = seeded_masks(maps, size, NO_REFINE)
    assert result.soft.shape == (2, *size) and result.seeds.shape == (2, h, w)
    assert ("otsu_middle" in result.stats[0]) == (sides == 3) and "otsu_fine" in result.stats[0]
    for b in range(2):
        soft, seeds = reference_soft(maps.cross[b].numpy(), *(a[b].numpy() for a in maps.self_attn), size=size)
        assert np.array_equal(result.seeds[b].numpy().ravel(), seeds)
        np.testing.assert_allclose(result.soft[b].numpy(), soft, rtol=0, atol=2e-5)


def test_key_pooled_fine_rows_keep_the_masks():
    """The capture's memory cap sums a large side's keys in f x f blocks: on known objects the masks barely move
    (bench/bench_key_pool.py measures it at SD 2.1-768's sides)."""
    scenes = [scene(*s) for s in SCENES]
    maps, images = batch_of(scenes)
    fine = maps.self_attn[2]  # 32 x 32 side
    pooled = fine.reshape(*fine.shape[:2], 16, 2, 16, 2).sum((3, 5)).flatten(2)
    full = seeded_masks(maps, (IMAGE, IMAGE), NO_REFINE)
    reduced = seeded_masks(AttentionMaps(maps.cross, [*maps.self_attn[:2], pooled]), (IMAGE, IMAGE), NO_REFINE)
    for b in range(len(scenes)):
        assert iou(full.mask[b].numpy(), reduced.mask[b].numpy()) >= 0.97, b
    assert (full.soft - reduced.soft).abs().mean() < 0.02


# ---------------------------------------------------------------- behaviour on known objects


def test_recovers_known_objects_with_the_default_pamr_recipe():
    scenes = [scene(*s) for s in SCENES]
    maps, images = batch_of(scenes)
    result = seeded_masks(maps, (IMAGE, IMAGE), MaskConfig(pamr_iterations=150), images)
    for b, (mask, _, _) in enumerate(scenes):
        assert iou(result.mask[b].numpy(), mask) >= 0.9, b
        assert result.stats[b]["num_seeds"] > 0 and result.stats[b]["gated_maps"] == 1
        assert result.soft.dtype == torch.float32 and 0 <= result.soft[b].min() and result.soft[b].max() <= 1


def test_unrefined_mask_sits_inside_the_object():
    """The official cascade under-segments (the notes measure IoU 0.63-0.97 at tau = 0.5): no false positives."""
    scenes = [scene(*s) for s in SCENES]
    maps, _ = batch_of(scenes)
    result = seeded_masks(maps, (IMAGE, IMAGE), NO_REFINE)
    for b, (mask, _, _) in enumerate(scenes):
        predicted = result.mask[b].numpy()
        assert (predicted & mask).sum() >= 0.98 * predicted.sum(), b
        assert iou(predicted, mask) >= 0.6, b
        assert torch.equal(result.mask[b], result.unrefined[b])


def test_batch_equals_one_by_one():
    scenes = [scene(*s) for s in SCENES]
    maps, images = batch_of(scenes)
    maps.cross[1] = maps.cross[1][:3]  # samples with different map counts
    config = MaskConfig(pamr_iterations=20)
    batched = seeded_masks(maps, (IMAGE, IMAGE), config, images)
    for b in range(len(scenes)):
        single = AttentionMaps([maps.cross[b]], [a[b : b + 1] for a in maps.self_attn])
        one = seeded_masks(single, (IMAGE, IMAGE), config, images[b : b + 1])
        torch.testing.assert_close(batched.soft[b], one.soft[0], rtol=0, atol=1e-6)
        assert torch.equal(batched.mask[b], one.mask[0])
        assert batched.stats[b] == pytest.approx(one.stats[0])


def test_variance_gate_downweights_a_near_flat_layer():
    informative = torch.zeros(SIDE, SIDE)
    informative[2:5, 2:5] = 1.0
    flat = torch.full((SIDE, SIDE), 0.5)
    flat[6, 6] = 0.52  # peaked elsewhere, but variance far below 1e-4
    coarse, gated = coarse_seed_map([torch.stack([informative, flat])])
    assert gated.tolist() == [1]
    assert coarse[0, 6, 6] == pytest.approx(0.01 / 1.0, abs=1e-6)  # 1% weight, then the sum's minmax
    assert coarse[0, 3, 3] == 1.0
    ungated, _ = coarse_seed_map([torch.stack([informative, flat * 100])])  # same shape, variance above the gate
    assert ungated[0, 6, 6] > 0.4


# ---------------------------------------------------------------- PAMR


def official_style_pamr(image, mask, iterations):
    """PAMR written with the official shift kernels: conv2d with +1 centre / -1 neighbour, 9 one-hot kernels for
    the local std, and 8 one-hot copy kernels applied each iteration."""
    one_hot = torch.eye(9, device=image.device).view(9, 1, 3, 3)
    copy = one_hot[[0, 1, 2, 3, 5, 6, 7, 8]]
    diff = -copy.clone()
    diff[:, 0, 1, 1] = 1
    b, c, h, w = image.shape
    x = F.pad(image.reshape(b * c, 1, h, w), [1] * 4, mode="replicate")
    std = F.conv2d(x, one_hot).reshape(b, c, 9, h, w).std(2, keepdim=True)
    aff = -F.conv2d(x, diff).abs().reshape(b, c, 8, h, w) / (1e-8 + 0.2 * std)
    aff = aff.mean(1, keepdim=True).softmax(2)
    m = mask[:, None].float()
    for _ in range(iterations):
        m = (F.conv2d(F.pad(m, [1] * 4, mode="replicate"), copy)[:, None] * aff).sum(2)
    return m[:, 0]


def edge_scene():
    rng = np.random.default_rng(5)
    truth = np.zeros((40, 40), bool)
    truth[:, :22] = True
    image = np.where(truth[None], 190.0, 60.0) + rng.normal(0, 3, (3, 40, 40))
    blurred = np.zeros((40, 40), bool)
    blurred[:, :16] = True  # the coarse mask stops 6 px short of the colour edge
    return truth, torch.from_numpy(image[None]).float(), torch.from_numpy(blurred[None])


def test_pamr_equals_official_kernel_formulation():
    _, image, mask = edge_scene()
    torch.testing.assert_close(pamr(image, mask.float(), 30), official_style_pamr(image, mask, 30),
                               rtol=0, atol=1e-5)


def test_pamr_moves_the_boundary_to_the_colour_edge():
    truth, image, mask = edge_scene()
    refined = (minmax(pamr(image, mask.float(), 1000)) > 0.5)[0].numpy()
    assert iou(refined, truth) > iou(mask[0].numpy(), truth) + 0.1
    assert iou(refined, truth) >= 0.95


def test_pamr_keeps_a_constant_mask_constant():
    _, image, _ = edge_scene()
    for value in (0.0, 1.0):
        out = pamr(image, torch.full((1, 40, 40), value), 100)
        torch.testing.assert_close(out, torch.full_like(out, value), rtol=0, atol=1e-4)  # float32 drift only


# ---------------------------------------------------------------- degenerate inputs


def test_degenerate_inputs_give_defined_flagged_results():
    n = [SIDE**2, (2 * SIDE) ** 2, (4 * SIDE) ** 2]
    uniform = [torch.full((2, k, k), 8.0 / k) for k in n]
    cases = {
        "all zero": AttentionMaps([torch.zeros(5, SIDE, SIDE)] * 2, [torch.zeros(2, k, k) for k in n]),
        "constant maps": AttentionMaps([torch.full((5, SIDE, SIDE), 0.3)] * 2, uniform),
        "no maps / uniform attention": AttentionMaps([torch.zeros(0, SIDE, SIDE), torch.rand(4, SIDE, SIDE)], uniform),
    }
    image = torch.rand(2, 3, IMAGE, IMAGE) * 255
    for name, maps in cases.items():
        for config in (NO_REFINE, MaskConfig(pamr_iterations=5)):
            result = seeded_masks(maps, (IMAGE, IMAGE), config, image)
            assert torch.isfinite(result.soft).all(), name
            assert not any(np.isnan(v) for s in result.stats for v in s.values()), name
    flat = seeded_masks(cases["all zero"], (IMAGE, IMAGE), NO_REFINE)
    assert [s["degenerate"] for s in flat.stats] == [1, 1] and [s["empty"] for s in flat.stats] == [1, 1]
    assert not flat.mask.any() and not flat.soft.any()


def test_minmax_of_a_constant_is_zero():
    assert torch.equal(minmax(torch.full((2, 3, 3), 4.0)), torch.zeros(2, 3, 3))


def test_bad_shapes_name_the_field():
    maps = random_maps(np.random.default_rng(0), batch=2)
    maps.self_attn[1] = maps.self_attn[1][:, :10]
    with pytest.raises(ValueError, match=r"self_attn\[1\]"):
        seeded_masks(maps, (IMAGE, IMAGE), NO_REFINE)
    with pytest.raises(ValueError, match="images"):
        seeded_masks(random_maps(np.random.default_rng(0), batch=2), (IMAGE, IMAGE), MaskConfig())


def test_pooled_sides_of_one_grid():
    """A single-grid model's coarser sides (MM-DiT): query rows averaged and keys summed in f x f blocks, from full
    or key-pooled rows alike; cross maps averaged; the cascade on sides pooled from the fine side alone still finds
    the objects."""
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 4 * 6, 4 * 6, generator=g)  # a 4 x 6 grid
    pooled = pool_self(attn, (4, 6), 2)
    blocks = attn.reshape(2, 2, 2, 3, 2, 2, 2, 3, 2)  # [B, qy, fy, qx, fx, ky, fy, kx, fx]
    assert torch.allclose(pooled, blocks.mean((2, 4)).sum((4, 6)).reshape(2, 6, 6))
    key_pooled = attn.reshape(2, 24, 2, 2, 3, 2).sum((3, 5)).flatten(2)  # the capture's key pool, g = 2
    assert torch.allclose(pool_self(key_pooled, (4, 6), 2), pooled)
    assert torch.equal(pool_self(attn, (4, 6), 1), attn)
    with pytest.raises(ValueError, match="cannot pool"):
        pool_self(attn, (4, 6), 4)
    assert torch.allclose(pool_cross(attn[:, :4].reshape(2, 4, 4, 6), 2)[0, 0],
                          attn[0, 0].reshape(2, 2, 3, 2).mean((1, 3)))
    scenes = [scene(*s) for s in SCENES]
    maps, images = batch_of(scenes)
    fine = maps.self_attn[2]  # the 32 x 32 side alone, as an MM-DiT captures it
    for factors in ((4, 2, 1), (4, 2)):  # to the grid; the MM-DiT default, grid/4 -> grid/2
        sides = [pool_self(fine, (4 * SIDE, 4 * SIDE), f) for f in factors]
        result = seeded_masks(AttentionMaps(maps.cross, sides), (IMAGE, IMAGE), MaskConfig(pamr_iterations=40),
                              images)
        for b, (mask, _, _) in enumerate(scenes):
            assert iou(result.unrefined[b].numpy(), mask) >= 0.75, (factors, b)
            assert iou(result.mask[b].numpy(), mask) >= 0.95, (factors, b)
