"""Reading a dataset back: plain webdataset, our pipeline in a 2-worker DataLoader, wids, Hugging Face datasets,
Ray Data, s3:// through fsspec, and a few training steps of a tiny segmentation net.

The fixture dataset is written by the real data plane (encode_sample -> ShardWriter -> write_index) from synthetic
arrays: each foreground is painted in its class colour, so a 2-layer conv net can learn the masks."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import seediff
from seediff.pipeline.index import write_index
from seediff.pipeline.plan import Plan
from seediff.pipeline.readers import SampleDecoder, raw_samples, segmentation_dataset, shard_urls, wids_dataset
from seediff.pipeline.resume import prepare_output
from seediff.pipeline.sources import AnnotatePlan, open_input
from seediff.pipeline.verify import verify_dataset
from seediff.schemas.config import AnnotateConfig, RunConfig
from seediff.schemas.records import IMAGE_FIELDS
from seediff.schemas.manifest import Manifest, class_row
from seediff.workers.encode import GeneratedImage, InputImage, LabelledSample, encode_sample
from tests.annotate_support import write_image_folder, write_input_shards
from tests.e2e_support import HANG_GUARD_S
from seediff.workers.shards import ShardWriter

SIZE = 32
CLASSES = ((1, "cat", 5), (2, "dog", 4), (7, "tree", 3))  # (class id, name, samples): 12 samples, 3 shards of 4
SAMPLES_PER_SHARD = 4
FAILED_SAMPLE = 5  # one failure, so counts differ between attempted and written
PALETTE = {1: (220, 30, 30), 2: (30, 220, 30), 7: (30, 30, 220)}
REPO = Path(__file__).resolve().parent.parent
# examples/demo.csv (2 classes x 6 samples) at the smallest settings of the tiny model: 2 shards of 6.
DEMO_FLAGS = ["--model", "tiny", "--resolution", "64", "--steps", "2", "--samples-per-shard", "6"]


def synthetic_arrays(sample_id: int, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image with a rectangle in the class colour; the mask is that rectangle."""
    rng = np.random.default_rng(sample_id)
    image = rng.integers(90, 160, size=(SIZE, SIZE, 3), dtype=np.uint8)
    top, left = rng.integers(0, SIZE // 2, size=2)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[top : top + SIZE // 2, left : left + SIZE // 2] = True
    image[mask] = PALETTE[class_id]
    return image, mask


def build_synthetic_dataset(out: str, image_format: str = "jpg") -> dict:
    """Write a finished output root (run.json, 3 shards, sizes.json, dataset.json); returns what was written."""
    rows = tuple(
        class_row(name, cid, n, f"a photograph of a {name}", "", line)
        for line, (cid, name, n) in enumerate(CLASSES, start=2)
    )
    manifest = Manifest(source="synthetic.csv", rows=rows, sha256="0" * 64)
    config = RunConfig(model="synthetic", resolution=64, steps=1, samples_per_shard=SAMPLES_PER_SHARD,
                       image_format=image_format, output_url=out)
    prepare_output(config, manifest, overwrite=False)
    plan = Plan(rows, config.seed, config.samples_per_shard, config.shard_layout)
    masks: dict[str, np.ndarray] = {}  # key -> the label map the shard must hold
    images: dict[str, np.ndarray] = {}  # key -> the pixels that were encoded
    for shard_id in range(plan.num_shards):
        shard = plan.shard(shard_id)
        with ShardWriter(config, shard) as writer:
            for spec in plan.samples(shard):
                if spec.sample_id == FAILED_SAMPLE:
                    failed = LabelledSample(GeneratedImage(spec), error="nsfw: blanked by the safety checker")
                    outcome = encode_sample(failed, config)
                else:
                    image, mask = synthetic_arrays(spec.sample_id, spec.class_id)
                    labels = mask * np.uint8(spec.class_id)
                    stats = {"foreground_fraction": float(mask.mean()), "confidence": 0.1 * (spec.sample_id % 4),
                             "classes": [{"pixel_fraction": float(mask.mean())}]}
                    outcome = encode_sample(LabelledSample(GeneratedImage(spec, image), labels, mask_stats=stats), config)
                    masks[spec.key], images[spec.key] = labels, image
                writer.add(outcome)
            writer.commit({})
    write_index(config, plan.num_shards)
    return {"root": out, "keys": list(masks), "masks": masks, "images": images, "num_shards": plan.num_shards,
            "config": config}


def build_annotated_dataset(out: str, source: str, classes_field: str | None) -> None:
    """An annotate output root written by the real data plane (AnnotatePlan reads the input, encode_sample,
    ShardWriter, write_index) over annotate_support's images, with synthetic label maps: a band per class whose
    height grows with the sample id, so a class-fraction filter keeps some samples and drops others."""
    config = RunConfig(model="synthetic", resolution=64, samples_per_shard=2, output_url=out,
                       annotate=AnnotateConfig(classes_field=classes_field))
    plan = AnnotatePlan(open_input(source, None if classes_field else ["dog", "cat"], classes_field), config)
    for shard_id in range(plan.num_shards):
        shard = plan.shard(shard_id)
        with ShardWriter(config, shard) as writer:
            for sample in plan.samples(shard):
                image_field = next(f for f in IMAGE_FIELDS if f in sample.fields)
                with Image.open(io.BytesIO(sample.fields[image_field])) as im:
                    width, height = im.size
                labels = np.zeros((height, width), np.uint8)
                band = max(1, height * (sample.spec.sample_id + 1) // 12)
                for k, labelled in enumerate(sample.spec.classes):
                    labels[k * band : (k + 1) * band] = labelled.class_id
                classes = [{"pixel_fraction": float((labels == c.class_id).mean()), "score": 0.5, "num_seeds": 1}
                           for c in sample.spec.classes]
                stats = {"classes": classes, "foreground_fraction": float((labels > 0).mean()),
                         "ignore_fraction": 0.0, "empty": not (labels > 0).any(), "degenerate": False,
                         "confidence": 0.5}
                labelled = LabelledSample(InputImage(sample, (width, height)), labels, mask_stats=stats)
                writer.add(encode_sample(labelled, config))
            writer.commit({})
    write_index(config, plan.num_shards)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic") / "out"))


# ---- shard lists ---------------------------------------------------------------------------------------------


def test_shard_urls_from_root_index_pattern_and_list(synthetic_dataset: dict, tmp_path: Path) -> None:
    root = synthetic_dataset["root"]
    expected = [f"{root}/seediff-{i:06d}.tar" for i in range(3)]
    assert shard_urls(root) == expected  # dataset.json
    assert shard_urls(root + "/seediff-{000000..000002}.tar") == expected
    assert shard_urls(expected[:2] + [expected[2]]) == expected
    bare = tmp_path / "bare"
    bare.mkdir()
    for url in expected:  # a directory of tars without any index
        (bare / Path(url).name).write_bytes(Path(url).read_bytes())
    assert shard_urls(str(bare)) == [str(bare / Path(u).name) for u in expected]
    with pytest.raises(ValueError, match="no shards found"):
        shard_urls(str(tmp_path / "empty"))


# ---- webdataset, unchanged --------------------------------------------------------------------------------------


def test_plain_webdataset_reads_the_shards(synthetic_dataset: dict) -> None:
    ds = wds.WebDataset(shard_urls(synthetic_dataset["root"]), shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == synthetic_dataset["keys"]
    for s in samples:
        assert {"jpg", "mask.png", "cls", "txt", "json"} <= s.keys()
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["class_id"] and s["txt"].decode() == meta["prompt"]
        with Image.open(io.BytesIO(s["mask.png"])) as m:
            assert m.mode == "L"
            np.testing.assert_array_equal(np.asarray(m), synthetic_dataset["masks"][s["__key__"]])


def test_segmentation_dataset_yields_image_label_mask_metadata(synthetic_dataset: dict) -> None:
    samples = list(segmentation_dataset(synthetic_dataset["root"], shuffle_shards=False))
    assert [meta["key"] for _, _, meta in samples] == synthetic_dataset["keys"]
    for image, mask, meta in samples:
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.dtype == torch.long and mask.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(mask.numpy(), synthetic_dataset["masks"][meta["key"]])  # label ids, not RGB colours
        assert meta["class_name"] in {name for _, name, _ in CLASSES}


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_uint8_returns_exactly_the_stored_pixels_and_label_values(image_format: str, tmp_path: Path) -> None:
    written = build_synthetic_dataset(str(tmp_path / "out"), image_format)
    stored = {s["__key__"]: s[image_format] for s in raw_samples(written["root"])}
    streamed = list(segmentation_dataset(written["root"], shuffle_shards=0, shuffle_buffer=0, dtype="uint8"))
    indexed = wids_dataset(written["root"], dtype="uint8")
    assert len(streamed) == len(indexed) == len(written["keys"])
    for (image, mask, meta), (wids_image, wids_mask, _) in zip(streamed, (indexed[i] for i in range(len(indexed)))):
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        assert mask.dtype == torch.uint8 and mask.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(mask.numpy(), written["masks"][meta["key"]])  # label values as stored
        with Image.open(io.BytesIO(stored[meta["key"]])) as im:  # Pillow's decode of the stored bytes
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))
        if image_format == "png":  # lossless: the very pixels that were encoded
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), written["images"][meta["key"]])
        assert torch.equal(wids_image, image) and torch.equal(wids_mask, mask)
    image, _, _ = next(iter(segmentation_dataset(written["root"], shuffle_shards=0, dtype="uint8", image_layout="hwc")))
    assert image.shape == (SIZE, SIZE, 3) and torch.equal(image.permute(2, 0, 1), streamed[0][0])
    with pytest.raises(ValueError, match="dtype"):
        segmentation_dataset(written["root"], dtype="int8")


@pytest.mark.parametrize("kind", ["generate", "annotate-from-folder", "annotate-from-shards"])
def test_quality_filter_keeps_the_same_samples_streaming_and_indexed(kind: str, synthetic_dataset: dict,
                                                                      tmp_path: Path) -> None:
    # The streaming filter reads each sample's seediff record (mask.json on annotate outputs; an input shard's own
    # json has no quality fields), wids reads the parquet: the same samples pass.
    if kind == "generate":
        root = synthetic_dataset["root"]
    else:
        root = str(tmp_path / "out")
        if kind == "annotate-from-folder":
            write_image_folder(tmp_path / "images")
            build_annotated_dataset(root, str(tmp_path / "images"), None)
        else:
            write_input_shards(tmp_path / "shards")
            build_annotated_dataset(root, str(tmp_path / "shards" / "in-{000000..000002}.tar"), "labels")
    everything = [meta["key"] for _, _, meta in segmentation_dataset(root, shuffle_shards=0, dtype="uint8")]
    quality = seediff.QualityFilter(min_class_fraction=0.2, min_confidence=0.15)  # generate: confidence varies
    streamed = [meta["key"] for _, _, meta in segmentation_dataset(root, shuffle_shards=0, quality=quality)]
    indexed = wids_dataset(root, quality=quality, dtype="uint8")
    assert [indexed[i][2]["key"] for i in range(len(indexed))] == streamed
    assert 0 < len(streamed) < len(everything)


def test_readers_pick_the_image_field_annotate_labels() -> None:
    # An annotated input with jpeg and png fields: annotate labels the first of IMAGE_FIELDS (jpeg), so must the
    # readers, never pair the png with the jpeg's mask.
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(jpeg, format="JPEG")
    Image.new("RGB", (6, 6), (10, 10, 200)).save(png, format="PNG")
    mask = io.BytesIO()
    Image.new("L", (8, 4), 1).save(mask, format="PNG")
    sample = {"__key__": "k", "png": png.getvalue(), "jpeg": jpeg.getvalue(), "mask.png": mask.getvalue(),
              "json": b'{"input": "own"}', "mask.json": b'{"key": "k"}'}
    image, labels, meta = SampleDecoder("uint8")(sample)
    assert image.shape == (3, 4, 8) and labels.shape == (4, 8) and meta == {"key": "k"}


def test_wids_reads_a_local_root_in_place_quietly(synthetic_dataset: dict, tmp_path: Path, capfd) -> None:
    root = Path(synthetic_dataset["root"])
    before = {p: p.stat().st_mtime_ns for p in root.iterdir()}
    cache = Path(os.environ.get("WIDS_CACHE", "/tmp/_wids_cache"))
    cached = set(cache.iterdir()) if cache.exists() else set()
    capfd.readouterr()
    ds = wids_dataset(str(root), dtype="uint8")
    assert [ds[i][2]["key"] for i in range(len(ds))] == synthetic_dataset["keys"]
    assert capfd.readouterr() == ("", "")  # quiet: wids prints its descriptor otherwise
    assert {p: p.stat().st_mtime_ns for p in root.iterdir()} == before  # nothing written in the root
    assert (set(cache.iterdir()) if cache.exists() else set()) == cached  # nor a copy in wids' cache


def test_dataloader_with_two_workers_yields_each_sample_once_per_epoch(synthetic_dataset: dict) -> None:
    ds = segmentation_dataset(synthetic_dataset["root"], shuffle_shards=True, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for _ in range(2):
        keys = [meta["key"] for _, _, meta in loader]
        assert sorted(keys) == sorted(synthetic_dataset["keys"])  # no sample lost, none repeated


def test_resampled_stream_has_the_requested_epoch_length(synthetic_dataset: dict) -> None:
    ds = segmentation_dataset(synthetic_dataset["root"], resampled=True, epoch_length=7)
    keys = [meta["key"] for _, _, meta in ds]
    assert len(keys) == 7 and set(keys) <= set(synthetic_dataset["keys"])
    with pytest.raises(ValueError, match="epoch_length"):
        segmentation_dataset(synthetic_dataset["root"], resampled=True)


def test_corrupt_shard_is_skipped_by_the_default_handler(synthetic_dataset: dict, tmp_path: Path) -> None:
    urls = shard_urls(synthetic_dataset["root"])
    missing = str(tmp_path / "gone.tar")
    with pytest.warns(UserWarning):
        keys = [meta["key"] for _, _, meta in segmentation_dataset([urls[0], missing], shuffle_shards=False)]
    assert keys == synthetic_dataset["keys"][:4]


def test_reads_s3_urls_through_fsspec(synthetic_dataset: dict, s3_output_url: str) -> None:
    fs = fsspec.filesystem("s3")
    for local in Path(synthetic_dataset["root"]).iterdir():
        fs.put_file(str(local), f"{s3_output_url}/{local.name}")
    keys = [meta["key"] for _, _, meta in segmentation_dataset(s3_output_url, shuffle_shards=False)]
    assert keys == synthetic_dataset["keys"]
    assert len(list(raw_samples(s3_output_url + "/seediff-000002.tar"))) == 3  # ids 2, 5, 8, 11; sample 5 failed


# ---- other readers ---------------------------------------------------------------------------------------------


def test_wids_from_dataset_json(synthetic_dataset: dict, tmp_path: Path) -> None:
    ds = wids_dataset(synthetic_dataset["root"], cache_dir=str(tmp_path / "wids-cache"))
    assert len(ds) == len(synthetic_dataset["keys"])
    keys = []
    for i in range(len(ds)):
        image, mask, meta = ds[i]
        assert image.shape == (3, SIZE, SIZE) and mask.dtype == torch.long
        np.testing.assert_array_equal(mask.numpy(), synthetic_dataset["masks"][meta["key"]])
        keys.append(meta["key"])
    assert keys == synthetic_dataset["keys"]


def test_hugging_face_datasets_loads_the_shards(synthetic_dataset: dict, tmp_path: Path) -> None:
    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": shard_urls(synthetic_dataset["root"])},
                               split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == len(synthetic_dataset["keys"])
    assert sorted(ds["__key__"]) == sorted(synthetic_dataset["keys"])
    row = ds[0]
    mask = np.asarray(row["mask.png"])  # HF decodes image fields to PIL; the label map survives as mode L
    np.testing.assert_array_equal(mask, synthetic_dataset["masks"][row["__key__"]])
    assert row["json"]["class_id"] == int(mask.max())


def test_ray_data_reads_the_shards(synthetic_dataset: dict) -> None:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # never a cluster left running
    try:
        ds = ray.data.read_webdataset(shard_urls(synthetic_dataset["root"]), decoder=None)
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == sorted(synthetic_dataset["keys"])
    for r in rows:
        assert {"jpg", "mask.png", "json"} <= r.keys()
        with Image.open(io.BytesIO(r["mask.png"])) as m:
            np.testing.assert_array_equal(np.asarray(m), synthetic_dataset["masks"][r["__key__"]])


# ---- training -------------------------------------------------------------------------------------------------


def test_a_few_steps_of_a_tiny_segmentation_net_lower_its_loss(synthetic_dataset: dict) -> None:
    torch.manual_seed(0)
    num_classes = max(cid for cid, *_ in CLASSES) + 1
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, num_classes, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    samples = list(segmentation_dataset(synthetic_dataset["root"]))
    images, masks = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = loss_fn(net(images), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- a dataset generated by the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`seediff generate examples/demo.csv --model tiny` in a child process (its local Ray ends with it)."""
    out = str(tmp_path_factory.mktemp("generated") / "out")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "seediff", "generate", "examples/demo.csv", "--out", out,
                          *DEMO_FLAGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_a_generated_dataset_reads_through_our_pipelines(generated_dataset: str) -> None:
    assert verify_dataset(generated_dataset) == []
    loader = torch.utils.data.DataLoader(segmentation_dataset(generated_dataset), batch_size=None, num_workers=2)
    streamed = {meta["key"]: (image, mask, meta) for image, mask, meta in loader}
    indexed = wids_dataset(generated_dataset, cache_dir=str(Path(generated_dataset).parent / "wids-cache"))
    assert len(indexed) == len(streamed) == 12
    for i in range(len(indexed)):
        image, mask, meta = indexed[i]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        assert set(mask.unique().tolist()) <= {0, meta["class_id"], 255}
        torch.testing.assert_close(streamed[meta["key"]][1], mask)
        torch.testing.assert_close(streamed[meta["key"]][0], image)


def test_training_example_lowers_its_loss_and_reports_miou(generated_dataset: str, tmp_path: Path) -> None:
    # examples/train_segmenter.py end to end on the tiny model's output: a few steps of the DeepLab-style net with
    # ignore_index=255, then eval-style mIoU on a labelled set in VOC layout (here the same output, exported).
    spec = importlib.util.spec_from_file_location("train_segmenter", REPO / "examples" / "train_segmenter.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert seediff.export(generated_dataset, tmp_path / "voc", layout="voc")["images"] == 12
    report = example.main([generated_dataset, "--val", str(tmp_path / "voc"), "--split", "train", "--steps", "6",
                           "--batch-size", "4", "--size", "32", "--width", "8", "--lr", "0.05", "--workers", "0",
                           "--out", str(tmp_path / "trained")])
    assert len(report["losses"]) == 6 and report["losses"][-1] < report["losses"][0]
    assert report["metrics"]["miou"] is not None and 0 < report["metrics"]["pixels"] <= 12 * 64 * 64
    assert json.loads((tmp_path / "trained" / "metrics.json").read_text())["metrics"] == report["metrics"]
