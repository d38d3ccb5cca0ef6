"""Labelled-dataset layouts: ``seediff export --layout voc`` from an output root, read back by our VOC reader, by
``seediff eval`` and by Datumaro's VOC importer (a reader no one here wrote: torchvision's ``VOCSegmentation``
cannot be used because PyPI's torchvision fails to import beside the CPU torch 2.13.0, "operator torchvision::nms
does not exist"); the ``labels`` layout with nested folders; errors that name the file, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seediff.pipeline.cli import main
from seediff.pipeline.index import write_index
from seediff.pipeline.layouts import (
    VOC_CLASSES,
    iter_labelled,
    open_labelled_dataset,
    read_class_list,
    voc_palette,
)
from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import prepare_output
from seediff.pipeline.sources import class_list
from seediff.pipeline.readers import raw_samples
from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import Manifest, class_row
from seediff.workers.encode import GeneratedImage, LabelledSample, encode_sample
from seediff.workers.shards import ShardWriter

CLASSES = ((3, "bird", 3), (12, "dog", 2))  # VOC ids: labelmap lines for the ids in between get placeholder names
SIZES = ((40, 24), (24, 40), (32, 32), (48, 16), (20, 30))  # (width, height) per sample


def label_map(sample_id: int, class_id: int, size: tuple[int, int]) -> np.ndarray:
    """A rectangle of the class with a 255 border (VOC's ignore band) on background."""
    width, height = size
    labels = np.zeros((height, width), np.uint8)
    top, left = 2 + sample_id % 3, 3
    labels[top : top + height // 2, left : left + width // 2] = IGNORE_BORDER
    labels[top + 1 : top + height // 2 - 1, left + 1 : left + width // 2 - 1] = class_id
    return labels


IGNORE_BORDER = 255


@pytest.fixture(scope="module")
def output_root(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An output root written by the real encoder and shard writer: png images of several sizes, label maps with
    255."""
    out = str(tmp_path_factory.mktemp("export") / "out")
    return {"root": out, "expected": write_output(out, CLASSES)}


def write_output(out: str, classes: tuple[tuple[int, str, int], ...]) -> dict:
    """An output root of ``classes`` ((id, name, samples)) written by the real encoder and shard writer; returns
    key -> (image, label map)."""
    rows = tuple(class_row(name, cid, n, f"a photo of a {name}", "", line) for line, (cid, name, n) in enumerate(classes, 2))
    config = RunConfig(model="synthetic", samples_per_shard=2, image_format="png", output_url=out)
    prepare_output(config, Manifest(source="m.csv", rows=rows, sha256="0" * 64), overwrite=False)
    plan = Plan(rows, config.seed, config.samples_per_shard)
    expected = {}
    for shard_id in range(plan.num_shards):
        shard = plan.shard(shard_id)
        with ShardWriter(config, shard) as writer:
            for spec in plan.samples(shard):
                size = SIZES[spec.sample_id % len(SIZES)]
                rng = np.random.default_rng(spec.sample_id)
                image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                labels = label_map(spec.sample_id, spec.class_id, size)
                writer.add(encode_sample(LabelledSample(GeneratedImage(spec, image), labels), config))
                expected[spec.key] = (image, labels)
            writer.commit({})
    write_index(config, plan.num_shards)
    return expected


@pytest.fixture(scope="module")
def exported(output_root: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("voc") / "VOC"
    assert main(["export", output_root["root"], "--layout", "voc", str(directory)]) == 0
    return directory


def test_export_writes_the_voc_layout(output_root: dict, exported: Path) -> None:
    keys = sorted(output_root["expected"])
    assert (exported / "ImageSets/Segmentation/train.txt").read_text().split() == keys
    names = read_class_list(str(exported / "labelmap.txt"))
    assert names[0] == "background" and names[3] == "bird" and names[12] == "dog" and len(names) == 13
    palette = voc_palette()
    for key, (image, labels) in output_root["expected"].items():
        with Image.open(exported / "SegmentationClass" / f"{key}.png") as im:
            assert im.mode == "P" and im.getpalette()[: 3 * 256] == palette
            np.testing.assert_array_equal(np.asarray(im), labels)
        with Image.open(exported / "JPEGImages" / f"{key}.jpg") as im:
            assert im.format == "JPEG" and im.size == (image.shape[1], image.shape[0])
    assert palette[3 * 255 : 3 * 256] == [224, 224, 192] and palette[3 * 15 : 3 * 16] == [192, 128, 128]  # VOC colours


def test_jpeg_images_are_copied_byte_for_byte(tmp_path: Path) -> None:
    from tests.test_readers import build_synthetic_dataset

    dataset = build_synthetic_dataset(str(tmp_path / "out"))
    assert main(["export", dataset["root"], "--layout", "voc", str(tmp_path / "voc"), "--split", "all"]) == 0
    for sample in raw_samples(dataset["root"]):
        assert (tmp_path / "voc/JPEGImages" / f"{sample['__key__']}.jpg").read_bytes() == sample["jpg"]
    assert (tmp_path / "voc/ImageSets/Segmentation/all.txt").read_text().split() == dataset["keys"]


def test_datumaro_reads_the_export(output_root: dict, exported: Path) -> None:
    """Datumaro (OpenVINO's dataset framework, CVAT's importer) decodes our palette PNGs through the labelmap
    colours into per-class masks; they must rebuild exactly our label maps, 255 border included."""
    import datumaro as dm

    dataset = dm.Dataset.import_from(str(exported), "voc_segmentation")
    names = [c.name for c in dataset.categories()[dm.AnnotationType.label]]
    assert names[:4] == ["background", "class_1", "class_2", "bird"] and names[12:] == ["dog", "ignored"]
    ignored = names.index("ignored")  # Datumaro's label for VOC's 255 border colour
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(output_root["expected"])
    for key, (image, labels) in output_root["expected"].items():
        item = items[key]
        assert item.subset == "train" and item.media.data.shape == image.shape
        rebuilt = np.zeros(labels.shape, np.uint8)
        for annotation in item.annotations:
            assert isinstance(annotation, dm.Mask)
            rebuilt[annotation.image.astype(bool)] = 255 if annotation.label == ignored else annotation.label
        np.testing.assert_array_equal(rebuilt, labels)


def test_eval_reads_the_export_back(output_root: dict, exported: Path, tmp_path: Path, capsys) -> None:
    """The exported labels scored against the output they came from: every labelled pixel right, the 255 border
    excluded from the ground truth."""
    assert main(["eval", str(exported), "--layout", "voc", "--out", str(tmp_path / "ev"),
                 "--predictions", output_root["root"]]) == 0
    report = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert report["miou"] == 1.0 and report["pixel_accuracy"] == 1.0 and report["ignore_fraction"] == 0.0
    assert report["per_class"]["bird"] == 1.0 and report["per_class"]["dog"] == 1.0
    assert report["per_class"]["class_5"] is None and report["missing_predictions"] == 0
    border = sum(int((labels == 255).sum()) for _, labels in output_root["expected"].values())
    total = sum(labels.size for _, labels in output_root["expected"].values())
    assert report["gt_ignore_fraction"] == pytest.approx(border / total)
    assert report["dataset"] == {"root": str(exported), "layout": "voc", "split": "train", "images": 5}
    assert "mIoU 100.00" in capsys.readouterr().out


def test_labels_layout_with_nested_folders(tmp_path: Path) -> None:
    root = tmp_path / "ade"
    for name, size in (("validation/a/x1", (20, 10)), ("validation/b/x2", (12, 18))):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "annotations" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(root / "images" / f"{name}.jpg")
        Image.fromarray(np.full((size[1], size[0]), 2, np.uint8)).save(root / "annotations" / f"{name}.png")
    (root / "classes.txt").write_text("# ADE-style\nbackground\nwall\nbuilding:1,2,3::\n")
    dataset = open_labelled_dataset(str(root), "labels")
    assert dataset.class_names == ("background", "wall", "building")
    assert [i.name for i in dataset.images] == ["validation/a/x1", "validation/b/x2"]
    assert [labels.shape for _, labels in iter_labelled(dataset)] == [(10, 20), (18, 12)]
    (root / "annotations/validation/b/x2.png").unlink()
    with pytest.raises(FileNotFoundError, match="x2.png: missing"):
        open_labelled_dataset(str(root), "labels")


def test_voc_defaults_and_bad_inputs_exit_2(tmp_path: Path, capsys) -> None:
    root = tmp_path / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("b\n")
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (4, 4)).save(root / "JPEGImages/b.jpg")
    dataset = open_labelled_dataset(str(root), "voc")  # no labelmap.txt: the 21 VOC classes, val by default
    assert dataset.split == "val" and dataset.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21
    (root / "bad.txt").write_text("cat\n\n:1,2,3::\n")
    args = ["eval", str(root), "--layout", "voc", "--out", str(tmp_path / "ev"), "--predictions", str(tmp_path)]
    assert main([*args, "--classes-file", str(root / "bad.txt")]) == 2
    assert f"{root / 'bad.txt'}:3: empty class name" in capsys.readouterr().err
    assert main([*args, "--split", "test"]) == 2
    assert "test.txt: no such image set (found: ['train', 'val'])" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--layout", "labels", "--out", str(tmp_path / "ev"),
                 "--predictions", str(tmp_path)]) == 2
    assert "expected images/ and labels or annotations/ folders" in capsys.readouterr().err


def test_a_ground_truth_of_another_size_than_its_image_exits_2_before_the_model(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    from seediff.pipeline import run

    root = tmp_path / "VOC"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    Image.new("RGB", (64, 48)).save(root / "JPEGImages/a.jpg")
    Image.fromarray(np.full((20, 20), 1, np.uint8)).save(root / "SegmentationClass/a.png")
    monkeypatch.setattr(run, "run_generation", lambda *a, **k: pytest.fail("the model ran"))
    assert main(["eval", str(root), "--layout", "voc", "--out", str(tmp_path / "ev"), "--model", "tiny",
                 "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "SegmentationClass/a.png: the ground truth is 20x20 but its image" in err and "is 64x48" in err


def test_class_names_with_list_syntax_round_trip_through_export_and_eval(tmp_path: Path, capsys) -> None:
    """labelmap.txt escapes what a class list reads as syntax: every name comes back at its own id."""
    names = ("a:b", "#hash", "x,y", '"q"', "猫")
    out = str(tmp_path / "out")
    write_output(out, tuple((i, name, 1) for i, name in enumerate(names, 1)))
    assert main(["export", out, "--layout", "voc", str(tmp_path / "VOC")]) == 0
    assert read_class_list(str(tmp_path / "VOC" / "labelmap.txt")) == ("background", *names)
    assert main(["eval", str(tmp_path / "VOC"), "--layout", "voc", "--out", str(tmp_path / "ev"),
                 "--predictions", out]) == 0
    report = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert report["miou"] == 1.0 and all(report["per_class"][name] == 1.0 for name in names)
    assert class_list("x\\,y,猫") == ["x,y", "猫"]  # --classes: the same codec
