"""``seediff annotate`` and ``seediff eval`` end to end on local Ray with the tiny model: WebDataset shards made here
(real JPEG and PNG images of several sizes and aspect ratios, class names in their json) and an image folder; every
input field passes through byte for byte, masks come at each image's own size, the output passes ``seediff
verify``, a killed driver's rerun is byte-identical to an uninterrupted run; ``eval`` on a small VOC-layout fixture
runs annotate on it and its mIoU equals torchmetrics' on the same predictions. The classes come from each sample's
json, its cls indexes into a class table, or the marked phrases of its caption (then its prompt)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from seediff import api
from seediff.pipeline.cli import main
from seediff.pipeline.layouts import voc_palette
from seediff.pipeline.readers import segmentation_dataset
from seediff.pipeline.sources import AnnotatePlan, open_input
from seediff.schemas.config import AnnotateConfig, MaskConfig, RunConfig
from seediff.workers.annotate import ANNOTATION
from seediff.workers.batch import label_batch
from seediff.workers.families import resolve
from seediff.schemas.records import decode_mask
from tests.annotate_support import (
    CLASS_TABLE, IMAGES, PHRASES, caption, image_bytes, write_image_folder, write_input_shards,
)
from tests.e2e_support import digests, run_cli
from tests.test_e2e_driver_kill import kill_after_first_commit
from tests.e2e_support import cli_command

# 64 px model input (latent 8), 2 timesteps, short PAMR, 2-sample output shards over 5 inputs: 3 shards.
FLAGS = ["--model", "tiny", "--resolution", "64", "--timestep", "100", "--timestep", "300",
         "--samples-per-shard", "2", "--batch-size", "2", "--mask-pamr-iterations", "5"]
CLASS_IDS = {"dog": 1, "cat": 2, "bird": 3}  # first appearance in the shards' json and captions; CLASS_TABLE order


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the module (tests/plugins/local_ray.py)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[dict]]:
    directory = tmp_path_factory.mktemp("input") / "shards"
    return directory, write_input_shards(directory)


@pytest.fixture(scope="module")
def annotated(shards, tmp_path_factory) -> Path:
    directory, _ = shards
    out = tmp_path_factory.mktemp("annotated") / "out"
    pattern = str(directory / "in-{000000..000002}.tar")
    assert main(["annotate", pattern, "--out", str(out), "--classes-field", "labels", *FLAGS, "--num-actors", "2"]) == 0
    return out


def output_samples(out: Path) -> list[dict]:
    return [s for tar in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)]


def test_shards_pass_through_byte_for_byte_with_masks_of_the_image_size(shards, annotated) -> None:
    _, written = shards
    samples = output_samples(annotated)
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(len(IMAGES))]
    for sample, source, (width, height, fmt, classes) in zip(samples, written, IMAGES):
        for name, value in source.items():
            if name != "__key__":
                assert sample[name] == value, name  # every input field, byte for byte
        assert set(sample) - set(source) - {"__url__", "__local_path__"} == {"mask.png", "mask.json"}
        labels = decode_mask(sample["mask.png"])
        assert labels.shape == (height, width)
        assert set(np.unique(labels).tolist()) <= {0, 255, *(CLASS_IDS[c] for c in classes)}
        meta = json.loads(sample["mask.json"])
        assert meta["source_key"] == source["__key__"] and meta["source_url"].endswith(".tar")
        assert [c["class_name"] for c in meta["classes"]] == classes
        assert meta["width"] == width and meta["height"] == height
    assert run_cli("verify", str(annotated)).returncode == 0
    decoded = list(segmentation_dataset(str(annotated), shuffle_shards=False))
    assert [tuple(m.shape) for _, m, _ in decoded] == [(h, w) for w, h, _, _ in IMAGES]


def test_verify_checks_an_annotated_outputs_sample_ids_against_its_plan(annotated, tmp_path: Path) -> None:
    """Verify cuts the planned shards of an annotate output from run.json's sample count, as it does a generated
    one's (it used to check only that the keys matched the parquets): a count that plans another id range is found."""
    out = tmp_path / "out"
    shutil.copytree(annotated, out)
    record = json.loads((out / "run.json").read_text())
    assert record["num_samples"] == len(IMAGES) == 5  # 3 shards of 2, 2 and 1
    (out / "run.json").write_text(json.dumps({**record, "num_samples": 6}))  # the last shard planned as ids 4..5
    found = api.check(str(out))
    assert any("seediff-000002.parquet: sample ids [4] are not the shard's planned ids [4, 5]" in p
               for p in found.problems), found.problems


@pytest.mark.parametrize("source", [["--classes-field", "cls", "--classes", ",".join(CLASS_TABLE)],
                                    ["--caption-field", "txt"]], ids=["cls-table", "caption"])
def test_classes_from_cls_indexes_or_caption_phrases(shards, tmp_path: Path, source: list[str]) -> None:
    directory, _ = shards
    out = tmp_path / "out"
    assert main(["annotate", str(directory / "in-{000000..000002}.tar"), "--out", str(out), *source, *FLAGS]) == 0
    samples = output_samples(out)
    assert len(samples) == len(IMAGES)
    for i, (sample, (_, _, _, classes)) in enumerate(zip(samples, IMAGES)):
        assert set(np.unique(decode_mask(sample["mask.png"])).tolist()) <= {0, 255, *(CLASS_IDS[c] for c in classes)}
        meta = json.loads(sample["mask.json"])
        assert [(c["class_name"], c["class_id"]) for c in meta["classes"]] == [(c, CLASS_IDS[c]) for c in classes]
        if "--caption-field" in source:  # the caption, rendered, was the prompt; dog's phrase is "puppy"
            assert meta["prompt"] == caption(i, classes, marked=False)
            assert [c["phrase"] for c in meta["classes"]] == [PHRASES[c][1] for c in classes]
    assert run_cli("verify", str(out)).returncode == 0
    assert main(["resume", str(out)]) == 0  # run.json decides the classes again: the same input fingerprint


def test_image_folder_with_one_vocabulary(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "images")
    (tmp_path / "images/b/99.jpg").write_bytes(b"not a jpeg")  # a broken file fails alone, its shard still commits
    out = tmp_path / "out"
    args = ["annotate", str(tmp_path / "images"), "--out", str(out), "--classes", "dog,cat", *FLAGS]
    assert main([*args, "--max-failed-fraction", "0.2"]) == 0  # 1 of 6 failed
    samples = output_samples(out)
    assert len(samples) == len(paths)
    rows = pq.read_table(out / "seediff-000002.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "failed"]
    assert rows[1]["error"] == f"image: file://{tmp_path / 'images/b/99.jpg'}: jpg: not an image Pillow can decode"
    for sample, path, (width, height, fmt, _) in zip(samples, paths, IMAGES):
        assert sample[fmt] == path.read_bytes()
        assert decode_mask(sample["mask.png"]).shape == (height, width)
        meta = json.loads(sample["mask.json"])
        assert meta["source_url"].endswith(path.name) and [c["class_id"] for c in meta["classes"]] == [1, 2]
    assert run_cli("verify", str(out)).returncode == 0


def test_missing_listed_file_fails_alone_and_a_run_where_every_sample_fails_exits_1(tmp_path: Path, capsys) -> None:
    paths = write_image_folder(tmp_path / "images")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\n{tmp_path / 'gone.jpg'}\n{paths[1]}\n")
    out = tmp_path / "out"
    args = ["annotate", str(listing), "--out", str(out), "--classes", "dog,cat", *FLAGS]
    assert main([*args, "--max-failed-fraction", "0.5"]) == 0  # 1 of 3 failed, alone: its shard commits
    rows = pq.read_table(out / "seediff-000000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "failed"]
    assert rows[1]["error"] == f"image: {tmp_path / 'gone.jpg'}: not found"
    assert len(output_samples(out)) == 2
    capsys.readouterr()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    listing.write_text(f"{tmp_path / 'gone.jpg'}\n{tmp_path / 'broken.png'}\n")
    assert main([*args[:3], str(tmp_path / "out2"), *args[4:]]) == 1
    printed = capsys.readouterr().out
    assert "0 samples written, 2 failed" in printed and "failed samples by stage: image 2" in printed
    assert "2 of 2 samples failed" in printed


def test_killed_driver_resumed_is_byte_identical(shards, annotated, tmp_path: Path) -> None:
    directory, _ = shards
    out = tmp_path / "out"
    args = ("annotate", str(directory / "in-{000000..000002}.tar"), "--out", str(out), "--classes-field", "labels",
            *FLAGS[:-4], "--samples-per-shard", "1", "--batch-size", "1", "--mask-pamr-iterations", "5", "--num-actors", "2")
    reference = tmp_path / "reference"
    kill_after_first_commit(cli_command(*args), out)  # its own driver and Ray, killed
    survivors = {p.name: p.read_bytes() for p in out.glob("*_stats.json")}
    assert 1 <= len(survivors) < len(IMAGES)
    # the reference and the resume run in this process, on the module's Ray: a fresh driver each, as from a shell
    assert main([*args[:3], str(reference), *args[4:]]) == 0
    assert main(["resume", str(out), "--num-actors", "2"]) == 0  # the input and settings recorded in run.json
    assert {p.name: p.read_bytes() for p in out.glob("*_stats.json") if p.name in survivors} == survivors
    assert digests(out) == digests(reference)
    assert main(["verify", str(out)]) == 0


def test_an_input_with_two_image_fields_is_labelled_checksummed_and_read_back_as_one(tmp_path: Path) -> None:
    # jpg + png (C5: verify and --repair looped) and jpeg + png (C6: readers paired the png with the jpeg's mask):
    # the image labelled, checksummed and read back is the first of IMAGE_FIELDS the sample holds.
    directory = tmp_path / "in"
    directory.mkdir()
    with wds.TarWriter(str(directory / "in-000000.tar"), encoder=False) as sink:
        sink.write({"__key__": "a", "jpg": image_bytes(0, 64, 64, "jpg"), "png": image_bytes(1, 48, 80, "png")})
        sink.write({"__key__": "b", "jpeg": image_bytes(2, 64, 64, "jpg"), "png": image_bytes(3, 48, 80, "png")})
    out = tmp_path / "out"
    assert main(["annotate", str(directory / "in-000000.tar"), "--out", str(out), "--classes", "dog", *FLAGS]) == 0
    assert run_cli("verify", str(out)).returncode == 0
    decoded = list(segmentation_dataset(str(out), shuffle_shards=False))
    assert [(tuple(image.shape[1:]), tuple(mask.shape)) for image, mask, _ in decoded] == [((64, 64), (64, 64))] * 2
    assert [meta["image_format"] for _, _, meta in decoded] == ["jpg", "jpeg"]
    assert {meta["dtype"] for _, _, meta in decoded} == {"float32"}  # as computed on the CPU, not "auto" (C15)


def test_vae_with_force_upcast_encodes_in_float32(tiny_pipe) -> None:
    # SDXL's VAE overflows in float16; diffusers' img2img upcasts a force_upcast VAE to encode (C16).
    from types import SimpleNamespace

    from seediff.workers.annotate import encode_latents

    vae = copy.deepcopy(tiny_pipe.vae).to(torch.float16)
    seen = []
    encode = vae.encode
    vae.encode = lambda x: seen.append((x.dtype, next(vae.parameters()).dtype)) or encode(x)
    pixels = torch.full((1, 3, 64, 64), 128.0)
    vae.register_to_config(force_upcast=True)
    latents = encode_latents(SimpleNamespace(vae=vae), pixels)
    assert seen == [(torch.float32, torch.float32)] and latents.dtype == torch.float16 and vae.dtype == torch.float16
    vae.register_to_config(force_upcast=False)
    encode_latents(SimpleNamespace(vae=vae), pixels)
    assert seen[1] == (torch.float16, torch.float16)


# ---- eval on a VOC-layout fixture ---------------------------------------------------------------------------------


def write_voc_fixture(root: Path) -> list[str]:
    """Four images of several sizes, palette label maps with objects of VOC classes and a 255 border, val.txt."""
    ids = []
    for i, (width, height, _, _) in enumerate(IMAGES[:4]):
        name = f"2007_{i:06d}"
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        (root / "JPEGImages" / f"{name}.jpg").write_bytes(image_bytes(i, width, height, "jpg"))
        labels = np.zeros((height, width), np.uint8)
        if i != 3:  # the last image has no object: scored as background without the model
            labels[height // 4 : 3 * height // 4, width // 4 : width // 2] = 255
            labels[height // 4 + 1 : 3 * height // 4 - 1, width // 4 + 1 : width // 2 - 1] = (8, 12, 15)[i]
        if i == 0:
            labels[2:8, -10:-2] = 12  # a second class in one image
        image = Image.frombytes("P", (width, height), labels.tobytes())
        image.putpalette(voc_palette())
        image.save(root / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_eval_end_to_end_matches_torchmetrics(tmp_path: Path, capsys) -> None:
    root = tmp_path / "VOC2012"
    ids = write_voc_fixture(root)
    out = tmp_path / "eval"
    assert main(["eval", str(root), "--layout", "voc", "--out", str(out), *FLAGS]) == 0
    report = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "pixel_accuracy", "ignore_fraction", "per_class"):
        assert key in report and key in report["cross_attention"]
    assert set(report["per_class"]) == set(json.loads((out / "metrics.json").read_text())["per_class"])
    assert report["missing_predictions"] == 0 and report["dataset"]["images"] == 4
    printed = capsys.readouterr().out
    assert "seediff: mIoU" in printed and "cross-attention: mIoU" in printed

    # The same predictions through torchmetrics: predicted 255 as an extra class, ground-truth 255 ignored.
    predictions = {}
    for sample in output_samples(out / "annotations"):
        predictions[json.loads(sample["mask.json"])["source_key"]] = decode_mask(sample["mask.png"])
    metric = MulticlassJaccardIndex(num_classes=22, ignore_index=255, average="none")
    present = np.zeros(21, bool)
    for name in ids:
        with Image.open(root / "SegmentationClass" / f"{name}.png") as im:
            target = np.array(im)
        prediction = predictions.get(name, np.zeros_like(target))  # the object-free image: background
        metric.update(torch.from_numpy(np.where(prediction == 255, 21, prediction).astype(np.int64)),
                      torch.from_numpy(target.astype(np.int64)))
        present[np.unique(target[target != 255])] = True
        present[np.unique(prediction[(prediction != 255) & (target != 255)])] = True
    reference = metric.compute().double().numpy()[:21]
    assert report["miou"] == pytest.approx(reference[present].mean(), abs=1e-6)
    for class_id in np.flatnonzero(present):
        assert report["classes"][class_id]["iou"] == pytest.approx(reference[class_id], abs=1e-6)
    assert report["gt_ignore_fraction"] > 0


def test_eval_of_a_background_only_dataset_scores_without_a_model(tmp_path: Path, capsys) -> None:
    root = tmp_path / "VOC2012"
    write_voc_fixture(root)
    for label in (root / "SegmentationClass").glob("*.png"):  # no object anywhere (C14: a traceback before)
        with Image.open(label) as im:
            blank = Image.frombytes("P", im.size, bytes(im.size[0] * im.size[1]))
        blank.putpalette(voc_palette())
        blank.save(label)
    out = tmp_path / "eval"
    assert main(["eval", str(root), "--layout", "voc", "--out", str(out), *FLAGS]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["missing_predictions"] == 0 and report["dataset"]["images"] == 4
    assert "Traceback" not in capsys.readouterr().err


def test_sdxl_annotates_with_its_pooled_text_and_size_conditioning(family_pipes, saved_models, tmp_path) -> None:
    """The SDXL family's UNet also needs the pooled text embedding and the size/crop ids (``added_cond_kwargs``):
    annotate builds them as the SDXL pipeline does, and labels every image at its own size with the run's ids."""
    config, _ = resolve(RunConfig(model=saved_models["sdxl"], resolution=128, batch_size=len(IMAGES),
                                  annotate=AnnotateConfig(timesteps=(100, 300)), mask=MaskConfig(pamr_iterations=5)))
    write_image_folder(tmp_path / "images")
    plan = AnnotatePlan(open_input(str(tmp_path / "images"), ["dog", "cat"], None), config)
    annotated = label_batch(family_pipes["sdxl"], plan.samples(plan.shard(0)), config, ANNOTATION)
    assert [a.error for a in annotated] == [None] * len(IMAGES)
    for result, (width, height, _, _) in zip(annotated, IMAGES):
        assert result.labels.shape == (height, width)
        assert set(np.unique(result.labels)) <= {0, 1, 2, 255}
        assert [c["class_id"] for c in result.mask_stats["classes"]] == [1, 2]
