"""Annotate inputs: tar URLs, brace patterns, dataset.json, folders of tars or images, text lists; sample counts,
class names from a json field, cls indexes into a class table, captions with marked phrases, reading a unit's samples
byte for byte, and errors that name the file (and the sample and field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from seediff.pipeline.sources import (
    AnnotateInputError,
    AnnotatePlan,
    class_list,
    indexed_classes,
    list_units,
    open_input,
    read_unit,
    sample_labels,
)
from seediff.schemas.config import AnnotateConfig, RunConfig
from seediff.tokens import class_token_positions, offline_clip_tokenizer
from tests.annotate_support import CLASS_TABLE, IMAGES, PHRASES, caption, write_image_folder, write_input_shards


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
    with pytest.raises(AnnotateInputError, match="give --classes, --classes-field or --caption-field"):
        open_input(str(directory), None, None)
    with pytest.raises(AnnotateInputError, match="give --classes-field or --caption-field, not both"):
        open_input(str(directory), None, "labels", "txt")
    with pytest.raises(AnnotateInputError, match=r"in-000000.tar: sample img0000: labels \(--classes-field\): expected "
                       r"class indexes \(integers, 0 = 'dog'\), got \['dog', 'cat'\]"):
        open_input(str(directory), ["dog", "cat"], "labels")  # names where a table's indexes belong
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
    assert "give --classes, --classes-field or --caption-field" in capsys.readouterr().err
    (tmp_path / "table.txt").write_text("dog\ncat\n")
    table = ["--classes", f"@{tmp_path}/table.txt", "--classes-field", "cls"]
    assert main(["annotate", str(directory), "--out", out, *table]) == 2
    assert "in-000001.tar: sample img0003: cls (--classes-field): class index 2 is outside the --classes table of 2 " \
           "names (0..1)" in capsys.readouterr().err  # the third image's bird, read while planning
    long_caption = directory / "long" / "in-000000.tar"  # a phrase past the 77 tokens the text encoder reads
    long_caption.parent.mkdir()
    with wds.TarWriter(str(long_caption)) as tar:
        tar.write({"__key__": "img0099", "jpg": (directory / "in-000000.tar").read_bytes()[:16],
                   "txt": ("x " * 80 + "a {dog}").encode()})
    assert main(["annotate", str(long_caption), "--out", out, "--caption-field", "txt", "--model", "tiny"]) == 2
    assert f"{long_caption}: sample img0099: txt (--caption-field): labelled phrase 'dog' (class 'dog') ends at " \
           "token" in capsys.readouterr().err  # checked while planning, like a manifest's templates
    assert main(["annotate", str(directory), "--out", out, "--classes", "dog", "--timestep", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seediff: error: --timestep: ") and "must be distinct integers in [0, 1000) (got [1000])" in err
    assert not (tmp_path / "out").exists()  # nothing written, no model, no Ray


# ---- classes from each sample's own fields ------------------------------------------------------------------------

URL, KEY = "s3://bucket/in-000007.tar", "img0042"


def sample(**fields: bytes) -> dict:
    return {"__url__": URL, "__key__": KEY, **fields}


def test_cls_indexes_the_class_table_from_zero() -> None:
    assert indexed_classes(sample(cls=b"2"), "cls", CLASS_TABLE) == ["bird"]
    assert indexed_classes(sample(cls=b" 2, 0\n"), "cls", CLASS_TABLE) == ["bird", "dog"]  # multi-label, in order
    assert indexed_classes(sample(cls=b"1 0"), "cls", CLASS_TABLE) == ["cat", "dog"]
    assert indexed_classes(sample(json=b'{"label": [1, 2]}'), "label", CLASS_TABLE) == ["cat", "bird"]  # no own field
    where = rf"^{URL}: sample {KEY}: cls \(--classes-field\): "
    with pytest.raises(AnnotateInputError, match=where + r"class index 3 is outside the --classes table of 3 names"):
        indexed_classes(sample(cls=b"0 3"), "cls", CLASS_TABLE)
    bad = [sample(cls=text) for text in (b"-1", b"dog", b"", b"1.5")] + [sample(json=b'{"cls": []}')]
    for fields in bad:
        with pytest.raises(AnnotateInputError, match=where + r"expected class indexes \(integers, 0 = 'dog'\)"):
            indexed_classes(fields, "cls", CLASS_TABLE)
    with pytest.raises(AnnotateInputError, match=rf"^{URL}: sample {KEY}: no field 'cls' and no json field"):
        indexed_classes(sample(txt=b"1"), "cls", CLASS_TABLE)


def test_class_table_from_a_list_or_a_file(tmp_path: Path) -> None:
    assert class_list(" dog, cat ,bird ") == list(CLASS_TABLE)
    (tmp_path / "classes.txt").write_text("# ImageNet-style table\ndog\n\ncat\nbird\n")
    assert class_list(f"@{tmp_path}/classes.txt") == list(CLASS_TABLE)
    with pytest.raises(AnnotateInputError, match="no class names"):
        class_list(" , ")
    with pytest.raises(AnnotateInputError, match="nowhere.txt: not found"):
        class_list(f"@{tmp_path}/nowhere.txt")


def test_caption_phrases_are_the_classes_and_place_their_tokens(shards) -> None:
    names, template = sample_labels(sample(txt=b"a dog toy by a {puppy:dog} on a {sofa:couch}\n"), None, "txt", None)
    assert names == ["dog", "couch"] and template.render(0).text == "a dog toy by a puppy on a sofa"
    assert sample_labels(sample(json=b'{"caption": "a {cat}"}'), None, "caption", None)[0] == ["cat"]
    where = rf"^{URL}: sample {KEY}: txt \(--caption-field\): "
    with pytest.raises(AnnotateInputError, match=where + r"caption 'a dog on a sofa' marks no class"):
        sample_labels(sample(txt=b"a dog on a sofa"), None, "txt", None)
    with pytest.raises(AnnotateInputError, match=where + r"column 3: unbalanced '\{'"):
        sample_labels(sample(txt=b"a {dog on a sofa"), None, "txt", None)

    # Through the plan: the rendered caption is the prompt, each class's tokens are its phrase's, ids by first use.
    directory, _ = shards
    image_input = open_input(str(directory), None, None, "txt")
    assert image_input.class_names == CLASS_TABLE and not image_input.class_table  # first use
    assert open_input(str(directory), ["bird"], None, "txt").class_names == ("bird", "dog", "cat")  # --classes first
    plan = AnnotatePlan(image_input, RunConfig(annotate=AnnotateConfig(caption_field="txt")))
    specs = [s.spec for s in plan.samples(plan.shard(0))]
    assert len(specs) == len(IMAGES)
    tokenizer = offline_clip_tokenizer()
    for spec, (_, _, _, classes) in zip(specs, IMAGES):
        assert spec.prompt.text == caption(spec.sample_id, classes, marked=False)
        assert [(c.name, c.class_id) for c in spec.classes] == [(c, CLASS_TABLE.index(c) + 1) for c in classes]
        offsets = tokenizer(spec.prompt.text, return_offsets_mapping=True)["offset_mapping"]
        positions = class_token_positions(tokenizer, spec.prompt)
        phrases = ["".join(spec.prompt.text[slice(*offsets[i])] for i in tokens) for tokens in positions]
        assert phrases == [PHRASES[c][1] for c in classes]  # the marked span, not the word "dog" before it


def test_cls_plan_labels_each_sample_with_its_indexed_classes(shards) -> None:
    directory, _ = shards
    image_input = open_input(str(directory), list(CLASS_TABLE), "cls")
    assert image_input.class_names == CLASS_TABLE and image_input.class_table
    plan = AnnotatePlan(image_input, RunConfig(annotate=AnnotateConfig(classes_field="cls")))
    specs = [s.spec for s in plan.samples(plan.shard(0))]
    assert [[(c.name, c.class_id) for c in s.classes] for s in specs] == [
        [(c, CLASS_TABLE.index(c) + 1) for c in classes] for _, _, _, classes in IMAGES
    ]
    assert specs[0].prompt.text == "a photograph of a dog and cat"


def test_a_truncated_input_tar_exits_2_naming_it_before_ray(shards, monkeypatch, tmp_path: Path, capsys) -> None:
    from seediff.pipeline import run
    from seediff.pipeline.cli import main

    directory, _ = shards
    tar = directory / "in-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])  # mid-member
    monkeypatch.setattr(run, "run_generation", lambda *a, **k: pytest.fail("the run started"))
    rc = main(["annotate", str(directory), "--out", str(tmp_path / "out"), "--classes", "dog,cat", "--model", "tiny",
               "--resolution", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("seediff: error: ") and len(err.splitlines()) == 1, err
    assert f"{tar}: unreadable tar after" in err
