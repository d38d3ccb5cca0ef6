"""Encoding of one sample: image formats, the mask label map, failures, and the flat metadata record."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from seediff.pipeline.plan import Plan
from seediff.pipeline.sources import AnnotatePlan, open_input
from seediff.schemas.config import AnnotateConfig
from seediff.schemas.records import metadata_json
from tests.test_shards import ROWS, make_config, synthetic
from seediff.schemas.records import decode_mask
from seediff.workers.encode import GeneratedImage, InputImage, LabelledSample, encode_image, encode_mask, encode_sample
from tests.annotate_support import IMAGES, write_input_shards

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
    outcome = encode_sample(LabelledSample(GeneratedImage(SPEC, image), mask, mask_stats=stats),
                            make_config("/unused", image_format="png"))
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
    outcome = encode_sample(LabelledSample(GeneratedImage(SPEC), error="nsfw: blanked"), make_config("/unused"))
    assert (outcome.status, outcome.error, outcome.image, outcome.mask) == ("failed", "nsfw: blanked", None, None)
    assert outcome.metadata["width"] is None and outcome.metadata["prompt"] == "a dog on grass"
    # no per-sample stage failed it: not a failed row but the shard's error (the shard is retried, never committed)
    with pytest.raises(RuntimeError, match=r"sample 000000000004: the batch returned no image or no mask"):
        encode_sample(LabelledSample(GeneratedImage(SPEC)), make_config("/unused"))


def test_bad_arrays_and_stats_are_rejected_naming_the_sample_and_field() -> None:
    image, mask = synthetic(SPEC)
    config = make_config("/unused")

    def encoded(image: np.ndarray, mask: np.ndarray, stats: dict | None = None):
        return encode_sample(LabelledSample(GeneratedImage(SPEC, image), mask, mask_stats=stats or {}), config)

    with pytest.raises(ValueError, match=r"sample 000000000004: image: expected H x W x 3 uint8"):
        encoded(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match=r"sample 000000000004: mask: expected \(64, 64\) uint8 labels"):
        encoded(image, mask[:32])
    with pytest.raises(ValueError, match=r"sample 000000000004: mask_stats\['hist'\]: expected a number"):
        encoded(image, mask, {"hist": [1, 2]})
    stray = encoded(image, np.where(mask == 7, 3, mask).astype(np.uint8), {"foreground_fraction": 0.5})
    assert (stray.status, stray.image, stray.mask, stray.fields) == ("failed", None, None, {})  # the sample's alone
    assert stray.error == "labels: sample 000000000004: mask: values [3] are neither 0, 255 nor the sample's class ids"
    assert stray.metadata["width"] is None and stray.metadata["mask_stat_foreground_fraction"] == 0.5


def test_an_annotated_input_keeps_its_fields_and_one_that_has_a_field_annotate_adds_fails_alone(tmp_path) -> None:
    written = write_input_shards(tmp_path)
    config = make_config("/unused", annotate=AnnotateConfig(classes_field="labels"))
    plan = AnnotatePlan(open_input(str(tmp_path / "in-000000.tar"), None, "labels"), config)
    sample = plan.samples(plan.shard(0))[0]
    width, height, _, _ = IMAGES[0]
    labels = np.zeros((height, width), np.uint8)
    cross = np.full((height, width), 2, np.uint8)
    outcome = encode_sample(LabelledSample(InputImage(sample, (width, height)), labels, {"cross.png": cross}), config)
    kept = {k: v for k, v in written[0].items() if not k.startswith("__")}
    assert outcome.status == "success" and outcome.image == kept["jpg"]
    assert {k: outcome.fields[k] for k in kept} == kept  # byte for byte, its own json included
    assert set(outcome.fields) == {*kept, "mask.png", "mask.json", "cross.png"}
    record = json.loads(outcome.fields["mask.json"])
    assert (record["width"], record["height"], record["image_format"], record["timesteps"]) == (width, height, "jpg", [100])
    assert np.array_equal(decode_mask(outcome.fields["cross.png"]), cross)
    clashing = InputImage(replace(sample, fields={**sample.fields, "mask.png": b"old"}), (width, height))
    failed = encode_sample(LabelledSample(clashing, labels), config)
    assert (failed.status, failed.error, failed.fields) == ("failed", "input fields: the input sample already has mask.png", {})
    assert failed.metadata["image_format"] == "jpg" and failed.metadata["width"] is None
