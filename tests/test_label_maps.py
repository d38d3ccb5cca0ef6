"""Label maps for several classes per image: the labelling rule, the one-class identity with today's masks, and
recovery of synthetic scenes with known label maps (the scenes bench/bench_scenes.py measures)."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest
import torch

from seediff.schemas.config import MaskConfig
from seediff.workers.seediff import AttentionMaps, label_maps, label_pixels, seeded_masks
from tests.test_seediff import IMAGE, SCENES, SIDE, batch_of, object_mask, scene, self_attention

BAND_OFF = dict(ignore_band=0.0)


# ---------------------------------------------------------------- synthetic scenes with known label maps


@dataclass(frozen=True)
class SceneObject:
    kind: str  # disc | square | bar (tests.test_seediff.object_mask)
    cy: float
    cx: float
    r: float
    class_id: int
    strength: float = 1.0  # scale of the class token's cross-attention on this object
    leaks: dict[int, float] = field(default_factory=dict)  # other class id -> its cross-attention here (similar classes)


@dataclass
class SyntheticScene:
    truth: np.ndarray  # [H, W] uint8 label map (later objects occlude earlier ones)
    class_ids: list[int]  # in order of first appearance
    cross: list[torch.Tensor]  # per class [layers, s, s]
    self_attn: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # coarse, middle, fine [N, N]
    image: torch.Tensor  # [3, H, W] float 0-255


def region_cells(regions: np.ndarray, count: int, side: int) -> np.ndarray:
    """Per attention cell, the region (0 = background) covering most of it."""
    cover = [cv2.resize((regions == r).astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
             for r in range(count + 1)]
    return np.argmax(np.stack(cover), 0).ravel()


def synthetic_scene(objects: list[SceneObject], seed: int, size: int = IMAGE, side: int = SIDE) -> SyntheticScene:
    """Self-attention groups each object (each instance its own region) and the background; each class's
    cross-attention peaks, blurred and noisy, on its objects (plus leaks onto similar classes' objects), with one
    near-flat layer, as in tests.test_seediff.scene."""
    rng = np.random.default_rng(seed)
    regions = np.zeros((size, size), np.int64)
    for i, o in enumerate(objects, 1):
        regions[object_mask(o.kind, o.cy, o.cx, o.r, size)] = i
    lookup = np.array([0] + [o.class_id for o in objects], np.uint8)
    truth = lookup[regions]
    class_ids = list(dict.fromkeys(o.class_id for o in objects))
    coarse_regions = region_cells(regions, len(objects), side).reshape(side, side)
    cross = []
    for class_id in class_ids:
        peak = np.zeros((side, side), np.float32)
        for i, o in enumerate(objects, 1):
            weight = o.strength if o.class_id == class_id else o.leaks.get(class_id, 0.0)
            peak += weight * (coarse_regions == i)
        layers = [cv2.GaussianBlur(peak, (3, 3), 0.8) * rng.uniform(0.5, 1.5) + rng.uniform(0, 0.15, peak.shape)
                  for _ in range(4)]
        layers.append(np.full(peak.shape, 0.02, np.float32) + rng.uniform(0, 1e-3, peak.shape))
        cross.append(torch.from_numpy(np.stack(layers).astype(np.float32)))
    attn = tuple(torch.from_numpy(self_attention(region_cells(regions, len(objects), k), rng))
                 for k in (side, 2 * side, 4 * side))
    palette = rng.uniform(30, 225, (len(objects) + 1, 3))
    image = np.clip(palette[regions].transpose(2, 0, 1) + rng.normal(0, 6, (3, size, size)), 0, 255)
    return SyntheticScene(truth, class_ids, cross, attn, torch.from_numpy(image.astype(np.float32)))


def scene_batch(scenes: list[SyntheticScene]) -> tuple[AttentionMaps, list[list[int]], torch.Tensor]:
    maps = AttentionMaps(
        cross=[s.cross for s in scenes], self_attn=[torch.stack([s.self_attn[i] for s in scenes]) for i in range(3)]
    )
    return maps, [s.class_ids for s in scenes], torch.stack([s.image for s in scenes])


def class_iou(labels: np.ndarray, truth: np.ndarray, class_id: int) -> float:
    """IoU of one class over the pixels not labelled ignore."""
    kept = labels != 255
    a, b = (labels == class_id) & kept, (truth == class_id) & kept
    return (a & b).sum() / max((a | b).sum(), 1)


TWO_APART = [SceneObject("disc", 20, 18, 12, 3), SceneObject("square", 42, 44, 12, 8)]
TOUCHING = [SceneObject("square", 32, 18, 13, 3), SceneObject("disc", 32, 44, 13, 8)]
TWO_INSTANCES_AND_A_THIRD = [SceneObject("disc", 16, 16, 10, 5), SceneObject("disc", 46, 46, 10, 5),
                             SceneObject("bar", 16, 46, 9, 2)]


# ---------------------------------------------------------------- the labelling rule


def test_label_pixels_background_band_margin_and_ties():
    # four pixels, two classes (ids 4 and 9): scores per class
    scores = torch.tensor([[[[0.2, 0.45, 0.95, 0.9]], [[0.1, 0.1, 0.1, 0.85]]]])  # [1, 2, 1, 4]
    ids = torch.tensor([[4, 9]])
    assert label_pixels(scores, ids, 0.5, 0.1, 0.1).tolist() == [[[0, 255, 4, 255]]]  # bg, band, class, margin
    assert label_pixels(scores, ids, 0.5, 0.0, 0.0).tolist() == [[[0, 0, 4, 4]]]  # rule off: argmax above 0.5
    assert label_pixels(scores, ids, 0.5, 0.0, 0.04).tolist() == [[[0, 0, 4, 4]]]  # 0.05 apart: no longer within
    assert label_pixels(scores, ids, 0.5, 0.35, 0.0).tolist() == [[[255, 255, 4, 4]]]  # band (0.15, 0.5]
    tie = torch.tensor([[[[0.7]], [[0.7]]]])
    assert label_pixels(tie, ids, 0.5, 0.0, 0.0).tolist() == [[[4]]]  # ties go to the first class
    # a second class below the threshold is no competitor, whatever the margin
    assert label_pixels(torch.tensor([[[[0.6]], [[0.45]]]]), ids, 0.5, 0.0, 0.5).tolist() == [[[4]]]
    one = torch.tensor([[[[0.3, 0.5, 0.51]]]])
    assert label_pixels(one, torch.tensor([[7]]), 0.5, 0.0, 0.9).tolist() == [[[0, 0, 7]]]


# ---------------------------------------------------------------- one class, band off: today's masks exactly


@pytest.mark.parametrize("config", [MaskConfig(refine="none", **BAND_OFF), MaskConfig(pamr_iterations=40, **BAND_OFF)],
                         ids=["none", "pamr"])
def test_one_class_with_the_band_off_is_exactly_the_seeded_mask(config):
    scenes = [scene(*s) for s in SCENES]
    maps, images = batch_of(scenes)
    maps.cross[1] = maps.cross[1][:3]  # samples with different map counts
    ids = [[b + 1] for b in range(len(scenes))]
    expected = seeded_masks(maps, (IMAGE, IMAGE), config, images)
    one_class = AttentionMaps([[c] for c in maps.cross], maps.self_attn)
    result = label_maps(one_class, ids, (IMAGE, IMAGE), config, images)
    assert result.labels.dtype == torch.uint8 and result.scores.shape == (len(scenes), 1, IMAGE, IMAGE)
    for b in range(len(scenes)):
        assert torch.equal(result.labels[b], expected.mask[b].to(torch.uint8) * (b + 1)), b
        assert result.stats[b]["classes"][0]["num_seeds"] == expected.stats[b]["num_seeds"]
        assert result.stats[b]["foreground_fraction"] == expected.stats[b]["foreground_fraction"]
    if config.refine == "none":
        assert torch.equal(result.scores[:, 0], expected.soft)


# ---------------------------------------------------------------- several classes


def test_two_classes_and_two_instances_are_recovered():
    scenes = [synthetic_scene(objects, seed) for seed, objects in
              enumerate([TWO_APART, TOUCHING, TWO_INSTANCES_AND_A_THIRD])]
    maps, ids, images = scene_batch(scenes)
    result = label_maps(maps, ids, (IMAGE, IMAGE), MaskConfig(pamr_iterations=150), images)
    assert result.scores.shape == (3, 2, IMAGE, IMAGE)
    for b, s in enumerate(scenes):
        labels = result.labels[b].numpy()
        assert set(np.unique(labels)) <= {0, 255, *s.class_ids}, b
        for class_id in s.class_ids:
            assert class_iou(labels, s.truth, class_id) >= 0.75, (b, class_id)
        assert result.stats[b]["ignore_fraction"] < 0.15, b
        assert [c["class_id"] for c in result.stats[b]["classes"]] == s.class_ids
        assert not result.stats[b]["empty"] and not result.stats[b]["degenerate"]
        fractions = {c["class_id"]: c["pixel_fraction"] for c in result.stats[b]["classes"]}
        assert fractions == {i: pytest.approx((labels == i).mean()) for i in s.class_ids}
    # the two instances of class 5 both carry class 5
    instances = result.labels[2].numpy()[[16, 46], [16, 46]]
    assert instances.tolist() == [5, 5]


def test_a_batch_mixing_one_and_three_classes_equals_one_by_one():
    scenes = [synthetic_scene(TWO_INSTANCES_AND_A_THIRD[2:], 7), synthetic_scene(TWO_INSTANCES_AND_A_THIRD, 8)]
    maps, ids, images = scene_batch(scenes)
    config = MaskConfig(pamr_iterations=20)
    batched = label_maps(maps, ids, (IMAGE, IMAGE), config, images)
    assert batched.scores.shape == (2, 2, IMAGE, IMAGE) and not batched.scores[0, 1].any()  # missing class: zero
    for b in range(2):
        alone = label_maps(scene_batch([scenes[b]])[0], [ids[b]], (IMAGE, IMAGE), config, images[b : b + 1])
        assert (batched.labels[b] != alone.labels[0]).float().mean() <= 1e-3
        assert len(batched.stats[b]["classes"]) == len(ids[b])


def test_the_fixed_api_names_the_three_sides():
    """``AttentionMaps(cross=, self_coarse=, self_middle=, self_fine=)`` (the form the scenes issue fixes) is the same
    maps as ``self_attn=[coarse, middle, fine]``."""
    scenes = [synthetic_scene(TWO_APART, 3)]
    maps, ids, images = scene_batch(scenes)
    coarse, middle, fine = maps.self_attn
    named = AttentionMaps(cross=maps.cross, self_coarse=coarse, self_middle=middle, self_fine=fine)
    assert named.self_coarse is coarse and named.self_fine is fine
    config = MaskConfig(pamr_iterations=20)
    a = label_maps(named, ids, (IMAGE, IMAGE), config, images)
    b = label_maps(maps, ids, (IMAGE, IMAGE), config, images)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)
    with pytest.raises(TypeError, match="either as self_attn or as self_coarse"):
        AttentionMaps(cross=maps.cross)


def test_bad_class_ids_are_refused():
    maps, ids, images = scene_batch([synthetic_scene(TWO_APART, 0)])
    with pytest.raises(ValueError, match="class_ids: expected one non-empty list per sample"):
        label_maps(maps, [[3]], (IMAGE, IMAGE), MaskConfig(refine="none"))
    with pytest.raises(ValueError, match=r"class_ids: ids must lie in 1\.\.254"):
        label_maps(maps, [[3, 255]], (IMAGE, IMAGE), MaskConfig(refine="none"))
