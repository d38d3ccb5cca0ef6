"""Manifest loading: every format, fsspec URLs, prompt templates, and bad input named by file, line and field."""

import hashlib
import json
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seediff.pipeline.plan import Plan
from seediff.schemas.manifest import COLUMNS, ManifestError, class_row, load_manifest


def write(tmp_path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def write_parquet(tmp_path, name: str, columns: dict) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


def expect_error(path: str, line: int | None, field: str, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    message = str(info.value)
    location = path if line is None else f"{path}:{line}"
    assert message.startswith(f"{location}: {field}: "), message
    return message


# ---------------------------------------------------------------- good input


def test_csv_with_all_columns(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        "class_name,num_samples,prompt,class_id,negative_prompt\n"
        "cat,3,a painting of a {class_name},7,blurry\n"
        "golden retriever,2,A photo of a Golden Retriever on grass,9,\n",
    )
    manifest = load_manifest(path)
    assert manifest.rows == (
        class_row("cat", 7, 3, "a painting of a cat", "blurry", 2),
        class_row("golden retriever", 9, 2, "A photo of a Golden Retriever on grass", "", 3),
    )
    assert manifest.num_samples == 5
    assert manifest.source == path
    with open(path, "rb") as f:
        assert manifest.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_defaults_class_ids_in_row_order_and_default_template(tmp_path):
    path = write(tmp_path, "m.csv", "class_name,num_samples\ncat,1\n\ndog,2\n")
    rows = load_manifest(path).rows
    assert [(r.classes[0].name, r.classes[0].class_id, r.prompts[0].render(0).text, r.negative_prompt, r.line) for r in rows] == [
        ("cat", 1, "a photograph of a cat", "", 2),
        ("dog", 2, "a photograph of a dog", "", 4),  # the blank line is counted
    ]


def test_configurable_template_and_only_the_placeholder_is_substituted(tmp_path):
    path = write(tmp_path, "m.csv", "class_name,num_samples,prompt\ncat,1,\ndog,1,{class_name} in \\{style\\}\n")
    rows = load_manifest(path, prompt_template="a {class_name}, studio light").rows
    assert [r.prompts[0].render(0).text for r in rows] == ["a cat, studio light", "dog in {style}"]


def test_tsv_with_bom_and_crlf(tmp_path):
    path = write(tmp_path, "m.tsv", b"\xef\xbb\xbfclass_name\tnum_samples\r\ncat\t4\r\nsea lion\t5\r\n")
    rows = load_manifest(path).rows
    assert [(r.classes[0].name, r.num_samples, r.line) for r in rows] == [("cat", 4, 2), ("sea lion", 5, 3)]


def test_jsonl_keys_may_vary_per_line(tmp_path):
    lines = [
        {"class_name": "cat", "num_samples": 3, "negative_prompt": "text, watermark"},
        {"class_name": "dog", "class_id": 5, "prompt": "a dog, {class_name}"},
        {"class_name": "cow", "num_samples": 2.0, "prompt": None},
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = load_manifest(path, samples_per_class=10).rows
    assert [(r.classes[0].name, r.classes[0].class_id, r.num_samples, r.prompts[0].render(0).text, r.negative_prompt) for r in rows] == [
        ("cat", 1, 3, "a photograph of a cat", "text, watermark"),
        ("dog", 5, 10, "a dog, dog", ""),  # the flag fills only where no count is given
        ("cow", 3, 2, "a photograph of a cow", ""),
    ]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = write_parquet(
        tmp_path,
        "m.parquet",
        {"class_name": ["cat", "dog"], "num_samples": pa.array([3, None], pa.int64()), "class_id": [4, 2]},
    )
    rows = load_manifest(path, samples_per_class=6).rows
    assert [(r.classes[0].name, r.classes[0].class_id, r.num_samples, r.line) for r in rows] == [("cat", 4, 3, 1), ("dog", 2, 6, 2)]


def test_text_file_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path, "classes.txt", "# animals\ncat\n\n  dog  \n   # not a class\nbird\n")
    rows = load_manifest(path, samples_per_class=7).rows
    assert [(r.classes[0].name, r.classes[0].class_id, r.num_samples, r.line) for r in rows] == [
        ("cat", 1, 7, 2),
        ("dog", 2, 7, 4),
        ("bird", 3, 7, 6),
    ]


def test_fsspec_memory_url():
    url = "memory://manifests/test_manifest.csv"
    with fsspec.open(url, "wb") as f:
        f.write(b"class_name,num_samples\ncat,2\n")
    try:
        manifest = load_manifest(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert manifest.source == url
    assert [(r.classes[0].name, r.num_samples) for r in manifest.rows] == [("cat", 2)]


def test_s3_url_on_a_moto_server(s3_output_url):
    url = f"{s3_output_url}/classes.jsonl"
    with fsspec.open(url, "wb") as f:
        f.write(b'{"class_name": "cat", "num_samples": 2}\n')
    assert [(r.classes[0].name, r.num_samples) for r in load_manifest(url).rows] == [("cat", 2)]
    missing = f"{s3_output_url}/nope.csv"
    with pytest.raises(ManifestError, match=re.escape(f"{missing}: manifest file not found")):
        load_manifest(missing)


def test_254_classes_fit_and_the_255th_is_rejected(tmp_path):
    names = [f"class{i}" for i in range(1, 256)]
    ok = write(tmp_path, "ok.txt", "\n".join(names[:254]))
    assert load_manifest(ok, samples_per_class=1).rows[-1].classes[0].class_id == 254
    too_many = write(tmp_path, "too_many.txt", "\n".join(names))
    expect_error(too_many, 255, "class_id", samples_per_class=1)


# ---------------------------------------------------------------- bad input, located by line and field

HEADER = "class_name,num_samples\n"

BAD_CSV = [
    # (id, content, line, field)
    ("missing class_name column", "name,num_samples\ncat,1\n", 1, "name"),
    ("no class_name column", "num_samples\n1\n", 1, "class_name"),
    ("no num_samples column", "class_name,prompt\ncat,\n", 1, "num_samples"),
    ("unknown column", "class_name,num_samples,colour\ncat,1,red\n", 1, "colour"),
    ("column twice", "class_name,num_samples,class_name\ncat,1,dog\n", 1, "class_name"),
    ("empty class name", HEADER + "cat,1\n,2\n", 3, "class_name"),
    ("whitespace class name", HEADER + "cat,1\n   ,2\n", 3, "class_name"),
    ("control character", HEADER + "cat,1\n\"d\x07og\",2\n", 3, "class_name"),
    ("newline inside a value", HEADER + "cat,1\n\"d\nog\",2\n", 3, "class_name"),
    ("zero-width class name", HEADER + "cat,1\n\u200b,2\n", 3, "class_name"),
    ("joiner inside a word", HEADER + "cat,1\nca\u200dt,2\n", 3, "class_name"),
    ("bidi override", HEADER + "cat,1\nab\u202ecd,2\n", 3, "class_name"),
    ("non-integer count", HEADER + "cat,1\ndog,ten\n", 3, "num_samples"),
    ("fractional count", HEADER + "cat,1\ndog,2.5\n", 3, "num_samples"),
    ("zero count", HEADER + "cat,1\ndog,0\n", 3, "num_samples"),
    ("negative count", HEADER + "cat,1\ndog,-4\n", 3, "num_samples"),
    ("absurd count", HEADER + "cat,1\ndog,1000000001\n", 3, "num_samples"),
    ("missing count", HEADER + "cat,1\ndog,\n", 3, "num_samples"),
    ("duplicate class name", HEADER + "cat,1\ndog,1\nCat,1\n", 4, "class_name"),
    ("duplicate class id", "class_name,num_samples,class_id\ncat,1,3\ndog,1,3\n", 3, "class_id"),
    ("default id collides", "class_name,num_samples,class_id\ncat,1,2\ndog,1,\n", 3, "class_id"),
    ("class id zero", "class_name,num_samples,class_id\ncat,1,0\n", 2, "class_id"),
    ("class id 255", "class_name,num_samples,class_id\ncat,1,255\n", 2, "class_id"),
    ("prompt without class", "class_name,num_samples,prompt\ncat,1,a photo of a dog\n", 2, "prompt"),
    ("control char in negative", "class_name,num_samples,negative_prompt\ncat,1,\"bad\x00\"\n", 2, "negative_prompt"),
    ("too many fields", HEADER + "cat,1\ndog,1,extra\n", 3, "columns"),
    ("unclosed quote", HEADER + "cat,1\n\"dog,1\n", 3, "columns"),
]


@pytest.mark.parametrize("content,line,field", [c[1:] for c in BAD_CSV], ids=[c[0] for c in BAD_CSV])
def test_bad_csv(tmp_path, content, line, field):
    expect_error(write(tmp_path, "bad.csv", content), line, field)


def test_unknown_column_message_names_the_allowed_ones(tmp_path):
    message = expect_error(write(tmp_path, "bad.tsv", "class_name\tcount\ncat\t1\n"), 1, "count")
    assert all(column in message for column in COLUMNS)


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "bad.csv", HEADER.encode() + b"cat,1\ncaf\xe9,2\ndog,3\n")
    expect_error(path, 3, "encoding")


BAD_JSONL = [
    ("malformed line", '{"class_name": "cat", "num_samples": 1}\n{"class_name": "dog", \n', 2, "json"),
    ("not an object", '{"class_name": "cat", "num_samples": 1}\n["dog", 1]\n', 2, "json"),
    ("unknown key", '{"class_name": "cat", "num_samples": 1, "weight": 2}\n', 1, "weight"),
    ("class name not text", '{"class_name": "cat", "num_samples": 1}\n{"class_name": 7, "num_samples": 1}\n', 2,
     "class_name"),
    ("missing class name", '{"class_name": "cat", "num_samples": 1}\n\n{"num_samples": 1}\n', 3, "class_name"),
    ("missing count", '{"class_name": "cat"}\n', 1, "num_samples"),
    ("boolean count", '{"class_name": "cat", "num_samples": true}\n', 1, "num_samples"),
    ("string class id", '{"class_name": "cat", "num_samples": 1, "class_id": "x"}\n', 1, "class_id"),
    ("control char escaped", '{"class_name": "cat", "num_samples": 1, "prompt": "a cat\\u001b"}\n', 1, "prompt"),
]


@pytest.mark.parametrize("content,line,field", [c[1:] for c in BAD_JSONL], ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl(tmp_path, content, line, field):
    expect_error(write(tmp_path, "bad.jsonl", content), line, field)


def test_bad_parquet_row_is_named_by_row_number(tmp_path):
    path = write_parquet(tmp_path, "bad.parquet", {"class_name": ["cat", "dog", "cow"], "num_samples": [1, 2, 0]})
    expect_error(path, 3, "num_samples")


def test_parquet_unknown_column_has_no_line(tmp_path):
    path = write_parquet(tmp_path, "bad.parquet", {"class_name": ["cat"], "num_samples": [1], "size": [2]})
    expect_error(path, None, "size")


def test_text_file_control_character(tmp_path):
    expect_error(write(tmp_path, "bad.txt", "cat\ndo\x00g\n"), 2, "class_name", samples_per_class=1)


def test_text_file_duplicate(tmp_path):
    expect_error(write(tmp_path, "bad.txt", "cat\n# x\nCAT\n"), 3, "class_name", samples_per_class=1)


# ---------------------------------------------------------------- bad input without a line


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match=re.escape(f"{path}: manifest file not found")):
        load_manifest(path)


def test_unknown_format(tmp_path):
    path = write(tmp_path, "m.xlsx", "class_name\n")
    with pytest.raises(ManifestError, match=re.escape(f"{path}: unknown manifest format; use one of .csv")):
        load_manifest(path)


@pytest.mark.parametrize("name,content", [("empty.csv", ""), ("header.csv", HEADER + "\n"), ("c.txt", "# x\n\n")])
def test_empty_manifest(tmp_path, name, content):
    message = expect_error(write(tmp_path, name, content), None, "class_name", samples_per_class=1)
    assert "empty manifest" in message


def test_text_file_needs_samples_per_class(tmp_path):
    expect_error(write(tmp_path, "c.txt", "cat\n"), None, "num_samples")


def test_corrupt_parquet(tmp_path):
    message = expect_error(write(tmp_path, "m.parquet", "class_name,num_samples\ncat,1\n"), None, "format")
    assert "Parquet" in message


def test_bad_arguments(tmp_path):
    path = write(tmp_path, "m.csv", HEADER + "cat,1\n")
    with pytest.raises(ManifestError, match="^samples_per_class: 0 outside"):
        load_manifest(path, samples_per_class=0)
    with pytest.raises(ManifestError, match="^prompt_template: .* must contain"):
        load_manifest(path, prompt_template="a photo")


# ---------------------------------------------------------------- scene tables: bad input named by file, line, field


@pytest.mark.parametrize(
    "rows,line,field,problem",
    [
        (["a {dog} and a [cat||cow]"], 2, "prompt", "column 15: empty alternative in [...] (alternative 2)"),
        (["a {dog and a cat"], 2, "prompt", "column 3: unbalanced '{'"),
        (["a {dog} on a [mat"], 2, "prompt", "column 14: unbalanced '['"),
        (["a dog and a cat"], 2, "prompt", "labels no class; mark phrases as {dog} or {puppy:dog}"),
        (["[a {dog}|a tree] on grass"], 2, "prompt", "some choices of alternatives label no class"),
        (["{a} {b} {c} {d} {e} {f} {g} {h} {i}"], 2, "prompt", "9 classes, at most 8 per prompt"),
        (["a {dog}", "a {cat}\u2060 asleep"], 3, "prompt", "column 8: zero-width or format character U+2060"),
    ],
)
def test_scene_table_errors_name_file_line_and_field(tmp_path, rows, line, field, problem):
    path = tmp_path / "scenes.csv"
    path.write_text("prompt,num_samples\n" + "".join(f'"{r}",1\n' for r in rows), encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}:{line}: {field}: "), str(info.value)
    assert problem in str(info.value)


def test_classes_file_fixes_ids_and_refuses_unknown_and_duplicate_classes(tmp_path):
    scenes = tmp_path / "scenes.csv"
    scenes.write_text("prompt,num_samples\na {cat} and a {dog},1\na {Dog} alone,1\n")
    classes = tmp_path / "classes.csv"
    classes.write_text("class_name,class_id\ndog,12\ncat,8\n")
    manifest = load_manifest(scenes, classes=classes)
    assert [(c.name, c.class_id) for c in manifest.classes] == [("cat", 8), ("dog", 12)]
    assert [[c.class_id for c in r.classes] for r in manifest.rows] == [[8, 12], [12]]
    classes.write_text("class_name,class_id\ndog,12\n")
    with pytest.raises(ManifestError, match=rf"^{scenes}:2: prompt: unknown class 'cat': not in the classes file"):
        load_manifest(scenes, classes=classes)
    classes.write_text("class_name,class_id\ndog,12\ncat,8\nDog,3\n")
    with pytest.raises(ManifestError, match=rf"^{classes}:4: class_name: duplicate class name 'Dog' \(first at {classes}:2\)"):
        load_manifest(scenes, classes=classes)
    classes.write_text("class_name,class_id\ndog,12\ncat,12\n")
    with pytest.raises(ManifestError, match=rf"^{classes}:3: class_id: duplicate class id 12 \(first at {classes}:2\)"):
        load_manifest(scenes, classes=classes)


def test_table_kinds_do_not_mix_and_keep_their_own_columns(tmp_path):
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('{"prompt": "a {dog}", "num_samples": 1}\n{"class_name": "cat", "num_samples": 1}\n')
    with pytest.raises(ManifestError, match=rf"^{mixed}:2: class_name: this row does not fit the scene table"):
        load_manifest(mixed)
    with_id = tmp_path / "ids.csv"
    with_id.write_text("prompt,num_samples,class_id\na {dog},1,4\n")
    with pytest.raises(ManifestError, match=rf"^{with_id}:2: class_id: a scene table takes class ids from"):
        load_manifest(with_id)
    other = tmp_path / "other.csv"
    other.write_text("class_name,num_samples,prompt\ncat,1,a {cat} next to a {dog}\n")
    with pytest.raises(ManifestError, match=rf"^{other}:2: prompt: labels class 'dog', but a class-table row labels only"):
        load_manifest(other)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {class_name}\n")
    scenes = tmp_path / "scenes.csv"
    scenes.write_text("prompt,num_samples\na {dog},1\n")
    with pytest.raises(ManifestError, match="a prompts file applies to class tables"):
        load_manifest(scenes, prompts=prompts)


def test_prompts_file_templates_are_drawn_per_sample(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one per line\na photo of a {class_name}\n\na {class_name}, [studio|outdoor] light\n")
    manifest = load_manifest(write(tmp_path, "c.txt", "cat\ndog\n"), samples_per_class=40, prompts=prompts)
    plan = Plan(manifest.rows, 0, 100)
    texts = [plan.sample(i).prompt.text for i in range(40)]
    assert set(texts) == {"a photo of a cat", "a cat, studio light", "a cat, outdoor light"}
    assert [plan.sample(i).prompt.text for i in range(40)] == texts  # again: the same draws
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(ManifestError, match=rf"^{bad}:1: prompt: 'a photo' must contain {{class_name}}"):
        load_manifest(write(tmp_path, "c2.txt", "cat\n"), samples_per_class=1, prompts=bad)
