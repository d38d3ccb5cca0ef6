"""Reading a dataset back: plain webdataset, our pipeline in a 2-worker DataLoader, wids, Hugging Face datasets,
Ray Data, s3:// through fsspec, and a few training steps of a tiny segmentation net.

The fixture dataset is written by the real data plane (encode_sample -> ShardWriter -> write_index) from synthetic
arrays: each foreground is painted in its class colour, so a 2-layer conv net can learn the masks."""

from __future__ import annotations

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

from seediff.pipeline.index import write_index
from seediff.pipeline.plan import Plan
from seediff.pipeline.readers import raw_samples, segmentation_dataset, shard_urls, wids_dataset
from seediff.pipeline.resume import prepare_output
from seediff.pipeline.verify import verify_dataset
from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import Manifest, class_row
from seediff.workers.encode import encode_sample
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


def build_synthetic_dataset(out: str) -> dict:
    """Write a finished output root (run.json, 3 shards, sizes.json, dataset.json); returns what was written."""
    rows = tuple(
        class_row(name, cid, n, f"a photograph of a {name}", "", line)
        for line, (cid, name, n) in enumerate(CLASSES, start=2)
    )
    manifest = Manifest(source="synthetic.csv", rows=rows, sha256="0" * 64)
    config = RunConfig(model="synthetic", resolution=64, steps=1, samples_per_shard=SAMPLES_PER_SHARD,
                       image_format="jpg", output_url=out)
    prepare_output(config, manifest, overwrite=False)
    plan = Plan(rows, config.seed, config.samples_per_shard)
    masks: dict[str, np.ndarray] = {}  # key -> the label map the shard must hold
    for shard_id in range(plan.num_shards):
        shard = plan.shard(shard_id)
        with ShardWriter(config, shard) as writer:
            for spec in plan.samples(shard):
                if spec.sample_id == FAILED_SAMPLE:
                    outcome = encode_sample(spec, None, None, {}, "nsfw: blanked by the safety checker", config)
                else:
                    image, mask = synthetic_arrays(spec.sample_id, spec.class_id)
                    labels = mask * np.uint8(spec.class_id)
                    outcome = encode_sample(spec, image, labels, {"foreground_fraction": float(mask.mean())}, None, config)
                    masks[spec.key] = labels
                writer.add(outcome)
            writer.commit({})
    write_index(config, plan.num_shards)
    return {"root": out, "keys": list(masks), "masks": masks, "num_shards": plan.num_shards, "config": config}


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
    assert len(list(raw_samples(s3_output_url + "/seediff-000001.tar"))) == 3  # sample 5 failed


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
                          *DEMO_FLAGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
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
