"""Annotate inputs: tar URLs, brace patterns, dataset.json, folders of tars or images, text lists; sample counts,
class names from a json field, reading a unit's samples byte for byte, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seediff.pipeline.sources import AnnotateInputError, list_units, open_input, read_unit
from tests.annotate_support import IMAGES, write_image_folder, write_input_shards


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[dict]]:
    return tmp_path / "in", write_input_shards(tmp_path / "in")


def test_tar_inputs_in_every_spelling_give_the_same_units(shards, tmp_path: Path) -> None:
    directory, _ = shards
    tars = [str(directory / f"in-{i:06d}.tar") for i in range(3)]
    assert [u.url for u in list_units(str(directory / "in-{000000..000002}.tar"))] == tars
    assert [u.url for u in list_units(tars[1])] == [tars[1]]
    assert [u.url for u in list_units(str(directory))] == [f"file://{t}" for t in tars]
    descriptor = {"wids_version": 1, "shardlist": [{"url": Path(t).name, "nsamples": n} for t, n in zip(tars, (2, 2, 1))]}
    (directory / "dataset.json").write_text(json.dumps(descriptor))
    for source in (str(directory / "dataset.json"), str(directory)):
        units = list_units(source)
        assert [(u.url, u.num_samples) for u in units] == list(zip(tars, (2, 2, 1)))


def test_counts_and_classes_from_the_json_field(shards) -> None:
    directory, samples = shards
    image_input = open_input(str(directory / "in-{000000..000002}.tar"), None, "labels")
    assert [u.num_samples for u in image_input.units] == [2, 2, 1] and image_input.num_samples == 5
    assert image_input.class_names == ("dog", "cat", "bird")  # first appearance in input order
    vocabulary = open_input(str(directory / "in-{000000..000002}.tar"), ["cat", "dog"], None)
    assert vocabulary.class_names == ("cat", "dog") and vocabulary.fingerprint() != image_input.fingerprint()
    read = [s for u in image_input.units for s in read_unit(u, 0, u.num_samples)]
    assert [s["__key__"] for s in read] == [s["__key__"] for s in samples]
    for got, written in zip(read, samples):  # every field byte for byte
        assert {k: v for k, v in got.items() if not k.startswith("__")} == {k: v for k, v in written.items() if k != "__key__"}
    assert [s["__key__"] for s in read_unit(image_input.units[1], 1, 2)] == ["img0003"]


def test_image_folder_and_list(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "images")
    (tmp_path / "images" / "notes.md").write_text("not an image")
    units = list_units(str(tmp_path / "images"))
    assert [u.url for u in units] == [f"file://{p}" for p in paths] and {u.kind for u in units} == {"file"}
    listing = tmp_path / "list.txt"
    listing.write_text("# images\n" + "\n".join(str(p) for p in paths[:2]) + "\n\nimages/b/03.png\n")
    assert [u.url for u in list_units(str(listing))] == [str(paths[0]), str(paths[1]), f"{tmp_path}/images/b/03.png"]
    sample = next(read_unit(units[2], 0, 1))
    assert sample["jpg"] == paths[2].read_bytes() and len(list(read_unit(units[1], 0, 1))) == 1
    assert len(IMAGES) == len(units)


def test_bad_inputs_name_the_file(tmp_path: Path, shards) -> None:
    directory, _ = shards
    with pytest.raises(AnnotateInputError, match="nowhere: not found"):
        list_units(str(tmp_path / "nowhere"))
    (tmp_path / "list.txt").write_text("a.jpg\nnotes.pdf\n")
    with pytest.raises(AnnotateInputError, match=r"list.txt:2: 'notes.pdf' is not an image path"):
        list_units(str(tmp_path / "list.txt"))
    with pytest.raises(AnnotateInputError, match="exactly one of --classes and --classes-field"):
        open_input(str(directory), ["dog"], "labels")
    with pytest.raises(AnnotateInputError, match=r"in-000000.tar: sample img0000: json has no key 'tags'"):
        open_input(str(directory), None, "tags")
    with pytest.raises(AnnotateInputError, match="needs WebDataset input"):
        open_input(str(write_image_folder(tmp_path / "f")[0].parent), None, "labels")


def test_annotate_refuses_bad_input_before_ray(tmp_path: Path, shards, capsys) -> None:
    from seediff.pipeline.cli import main

    directory, _ = shards
    out = str(tmp_path / "out")
    assert main(["annotate", str(tmp_path / "nowhere"), "--out", out, "--classes", "dog"]) == 2
    assert "nowhere: not found" in capsys.readouterr().err
    assert main(["annotate", str(directory), "--out", out]) == 2
    assert "give exactly one of --classes and --classes-field" in capsys.readouterr().err
    assert main(["annotate", str(directory), "--out", out, "--classes", "dog", "--timestep", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seediff: error: --timestep: ") and "must be distinct integers in [0, 1000) (got [1000])" in err
    assert not (tmp_path / "out").exists()  # nothing written, no model, no Ray
