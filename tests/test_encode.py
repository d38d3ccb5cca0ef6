"""Encoding of one sample: image formats, the mask label map, failures, and the flat metadata record."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from seediff.pipeline.plan import Plan
from seediff.schemas.records import metadata_json
from tests.test_shards import ROWS, make_config, synthetic
from seediff.schemas.records import decode_mask
from seediff.workers.encode import encode_image, encode_mask, encode_sample

SPEC = Plan(ROWS, 0, 4).sample(4)  # a "dog" sample (class id 7)


def test_mask_png_is_an_8bit_label_map_with_the_class_id_and_ignore() -> None:
    _, labels = synthetic(SPEC)
    data = encode_mask(labels)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode) == ("PNG", "L")
    decoded = decode_mask(data)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, labels)
    assert set(np.unique(decoded)) == {0, 7, 255}


def test_decode_mask_rejects_an_rgb_png() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="mask.png: expected an 8-bit single-channel"):
        decode_mask(buf.getvalue())


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_image_formats_decode_to_the_image_and_are_deterministic(fmt: str, pil_format: str) -> None:
    image, _ = synthetic(SPEC)
    data = encode_image(image, fmt, 95)
    assert encode_image(image.copy(), fmt, 95) == data
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size, im.mode) == (pil_format, (64, 64), "RGB")
        if fmt == "png":
            np.testing.assert_array_equal(np.asarray(im), image)


def test_jpeg_quality_is_applied() -> None:
    image, _ = synthetic(SPEC)
    assert len(encode_image(image, "jpg", 50)) < len(encode_image(image, "jpg", 95))


def test_successful_sample_has_bytes_and_flat_metadata() -> None:
    image, mask = synthetic(SPEC)
    stats = {"foreground_fraction": np.float32(0.25), "num_seeds": np.int64(3), "score": float("nan")}
    outcome = encode_sample(SPEC, image, mask, stats, None, make_config("/unused", image_format="png"))
    assert (outcome.status, outcome.error) == ("success", None)
    assert set(np.unique(decode_mask(outcome.mask))) == {0, 7, 255}
    meta = outcome.metadata
    assert meta["key"] == "000000000004" and meta["sample_id"] == 4 and meta["seed"] == SPEC.seed
    assert (meta["class_name"], meta["class_id"], meta["negative_prompt"]) == ("dog", 7, "blurry")
    assert (meta["width"], meta["height"], meta["image_format"]) == (64, 64, "png")
    assert meta["mask_refine"] == "pamr" and meta["mask_stat_num_seeds"] == 3
    assert meta["mask_stat_score"] is None  # NaN is not JSON
    assert all(not isinstance(v, dict) for v in meta.values())
    assert meta["classes"] == [{"class_id": 7, "class_name": "dog", "phrase": "dog", "occurrences": 1}]
    assert json.loads(metadata_json(meta)) == meta
    assert metadata_json(dict(reversed(meta.items()))) == metadata_json(meta)  # key order does not matter


def test_failed_sample_keeps_metadata_but_no_bytes() -> None:
    outcome = encode_sample(SPEC, None, None, {}, "nsfw: blanked", make_config("/unused"))
    assert (outcome.status, outcome.error, outcome.image, outcome.mask) == ("failed", "nsfw: blanked", None, None)
    assert outcome.metadata["width"] is None and outcome.metadata["prompt"] == "a dog on grass"
    missing = encode_sample(SPEC, None, None, {}, None, make_config("/unused"))
    assert missing.status == "failed" and missing.error.startswith("missing output")


def test_bad_arrays_and_stats_are_rejected_naming_the_sample_and_field() -> None:
    image, mask = synthetic(SPEC)
    config = make_config("/unused")
    with pytest.raises(ValueError, match=r"sample 000000000004: image: expected H x W x 3 uint8"):
        encode_sample(SPEC, image.astype(np.float32), mask, {}, None, config)
    with pytest.raises(ValueError, match=r"sample 000000000004: mask: expected \(64, 64\) uint8 labels"):
        encode_sample(SPEC, image, mask[:32], {}, None, config)
    with pytest.raises(ValueError, match=r"sample 000000000004: mask: values \[3\] are neither 0, 255 nor"):
        encode_sample(SPEC, image, np.where(mask == 7, 3, mask).astype(np.uint8), {}, None, config)
    with pytest.raises(ValueError, match=r"sample 000000000004: mask_stats\['hist'\]: expected a number"):
        encode_sample(SPEC, image, mask, {"hist": [1, 2]}, None, config)
