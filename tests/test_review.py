"""inspect / preview / verify on a dataset written by the real data plane, and on corrupted copies of it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from seediff.pipeline.review import LEGEND_ROW, format_inspection, inspect_dataset, preview_grid, run_class_names
from seediff.pipeline.verify import verify_dataset
from tests.e2e_support import HANG_GUARD_S
from tests.test_readers import REPO, synthetic_dataset  # noqa: F401 - fixture

SHARD0, SHARD1 = "seediff-000000", "seediff-000001"


@pytest.fixture
def copy_of(synthetic_dataset: dict, tmp_path: Path) -> Path:  # noqa: F811 - the imported fixture
    """A private copy of the dataset to corrupt."""
    return Path(shutil.copytree(synthetic_dataset["root"], tmp_path / "copy"))


# ---- inspect ---------------------------------------------------------------------------------------------------


def test_inspect_counts_classes_failures_bytes_and_settings(synthetic_dataset: dict) -> None:  # noqa: F811
    info = inspect_dataset(synthetic_dataset["root"])
    assert info["samples"] == 11 and info["attempted"] == 12 and info["failures"] == 1
    assert info["failures_by_reason"] == {"nsfw": 1}
    assert info["shards"] == info["expected_shards"] == 3 and info["missing_shards"] == []
    assert info["classes"] == [  # ids 0-4 cat, 5-8 dog (5 failed), 9-11 tree; each mask a quarter of its image
        {"class_id": 1, "class_name": "cat", "samples": 5, "failures": 0, "pixel_fraction": 0.25},
        {"class_id": 2, "class_name": "dog", "samples": 3, "failures": 1, "pixel_fraction": 0.25},
        {"class_id": 7, "class_name": "tree", "samples": 3, "failures": 0, "pixel_fraction": 0.25},
    ]
    tar_bytes = sum(p.stat().st_size for p in Path(synthetic_dataset["root"]).glob("*.tar"))
    assert info["bytes"]["tar"] == tar_bytes and info["bytes"]["total"] > tar_bytes
    assert info["model"] == "synthetic" and info["settings"]["samples_per_shard"] == 4
    text = format_inspection(info)
    for needle in ("11 written", "1 failed", "3 of 3 committed", "nsfw: 1", "tree", "mask.refine = pamr"):
        assert needle in text


def test_inspect_of_a_truncated_parquet_exits_2_in_one_line(copy_of: Path) -> None:
    parquet = copy_of / f"{SHARD0}.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])
    done = subprocess.run([sys.executable, "-m", "seediff", "inspect", str(copy_of)], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"{SHARD0}.parquet: unreadable parquet" in done.stderr and "verify --repair" in done.stderr


def test_the_run_class_table_comes_from_run_json_of_every_kind_and_age() -> None:
    assert run_class_names({"class_names": {"12": "dog", "8": "cat"}}) == {12: "dog", 8: "cat"}
    assert run_class_names({"classes": ["dog", "cat"], "input_source": "in/"}) == {1: "dog", 2: "cat"}  # old annotate
    assert run_class_names({"manifest_source": "m.csv"}) == {}  # old generate: named from the parquets and records


# The threads of a fresh process before and after inspect: Arrow starts its thread pool on first use, so a read that
# used it leaves its workers behind.
THREADS_AROUND_INSPECT = """
import os, sys
from seediff.pipeline import readers, review
before = len(os.listdir("/proc/self/task"))
review.inspect_dataset(sys.argv[1])
print(before, len(os.listdir("/proc/self/task")))
"""


def test_inspect_leaves_no_thread_behind(synthetic_dataset: dict) -> None:  # noqa: F811
    """`seediff inspect` aborted after printing everything in about 1 run of 4 (exit 134, "terminate called without an
    active exception"; a core dump showed it): a worker of Arrow's thread pool, decoding a parquet, released its
    hold on the file's Python buffers after the read had returned, during interpreter shutdown, where it cannot take
    the GIL. Parquets are decoded on the calling thread now, so no such worker exists at exit."""
    run = subprocess.run([sys.executable, "-c", THREADS_AROUND_INSPECT, synthetic_dataset["root"]], cwd=REPO,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = run.stdout.split()
    assert after == before, run.stdout


# ---- preview ---------------------------------------------------------------------------------------------------


def test_preview_writes_a_png_of_the_stated_size(synthetic_dataset: dict, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "grid.png"
    size = preview_grid(synthetic_dataset["root"], str(out), n=64, cell=48)
    assert size[0] == 4 * 48  # 11 samples -> 4 columns x 3 rows, then legend lines
    assert size[1] > 3 * 48 and (size[1] - 3 * 48) % LEGEND_ROW == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == size
        sheet = np.asarray(im.convert("RGB"))
    assert sheet[: 48 * 3, : 48 * 3].std() > 10  # cells hold pictures, not a blank sheet


def test_preview_of_one_class(synthetic_dataset: dict, tmp_path: Path) -> None:  # noqa: F811
    width, height = preview_grid(synthetic_dataset["root"], str(tmp_path / "t.png"), n=2, class_name="tree", cell=32)
    assert width == 64 and height > 32 and (height - 32) % LEGEND_ROW == 0
    with pytest.raises(ValueError, match="no samples of class 'zebra'"):
        preview_grid(synthetic_dataset["root"], str(tmp_path / "z.png"), class_name="zebra")


# ---- verify ----------------------------------------------------------------------------------------------------


def test_verify_passes_a_complete_dataset(synthetic_dataset: dict) -> None:  # noqa: F811
    assert verify_dataset(synthetic_dataset["root"]) == []


def test_verify_catches_a_truncated_tar(copy_of: Path) -> None:
    tar = copy_of / f"{SHARD1}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    problems = "\n".join(verify_dataset(str(copy_of)))
    assert f"{SHARD1}.tar: unreadable tar" in problems
    assert f"{SHARD1}: sample count mismatch" in problems


def test_verify_catches_a_missing_stats_file(copy_of: Path) -> None:
    (copy_of / f"{SHARD0}_stats.json").unlink()
    assert f"{SHARD0}_stats.json: missing stats file (shard not committed)" in verify_dataset(str(copy_of))


def test_verify_catches_a_missing_shard(copy_of: Path) -> None:
    for path in copy_of.glob(f"{SHARD1}*"):
        path.unlink()
    assert f"{SHARD1}: missing shard (no tar, parquet or stats file)" in verify_dataset(str(copy_of))


def test_verify_catches_a_count_mismatch_with_the_index(copy_of: Path) -> None:
    sizes = json.loads((copy_of / "sizes.json").read_text())
    sizes[f"{SHARD0}.tar"] += 1
    (copy_of / "sizes.json").write_text(json.dumps(sizes))
    (problem,) = verify_dataset(str(copy_of))
    assert problem.startswith(f"{SHARD0}: sample count mismatch") and "sizes.json 5" in problem


def test_verify_catches_an_out_of_range_mask_value(copy_of: Path) -> None:
    tar = copy_of / f"{SHARD0}.tar"
    _rewrite_first_mask(tar, value=42)
    problems = verify_dataset(str(copy_of))
    assert any("mask values [42] outside the sample's class ids [0, 1, 255]" in p for p in problems), problems
    _rewrite_first_mask(tar, value=2)  # another class of the dataset, but not of this sample
    assert any("mask values [2] outside the sample's class ids [0, 1, 255]" in p for p in verify_dataset(str(copy_of)))


def test_verify_catches_non_contiguous_fields(copy_of: Path) -> None:
    tar = copy_of / f"{SHARD0}.tar"
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    members.append(members.pop(0))  # the first sample's first field moves to the end
    _write_tar(tar, members)
    assert any("not contiguous" in p for p in verify_dataset(str(copy_of)))


def _rewrite_first_mask(tar: Path, value: int) -> None:
    """Same tar, but the first mask.png has one pixel set to ``value``."""
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".mask.png"))
    labels = np.asarray(Image.open(io.BytesIO(members[index][1]))).copy()
    labels[0, 0] = value
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    members[index] = (members[index][0], buf.getvalue())
    _write_tar(tar, members)


def _write_tar(tar: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for info, data in members:
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_inspect_and_verify_read_an_s3_output(synthetic_dataset: dict, s3_output_url: str) -> None:  # noqa: F811
    fs = fsspec.filesystem("s3")
    for local in Path(synthetic_dataset["root"]).iterdir():
        fs.put_file(str(local), f"{s3_output_url}/{local.name}")
    assert inspect_dataset(s3_output_url)["samples"] == 11
    assert verify_dataset(s3_output_url) == []
    fs.rm(f"{s3_output_url}/{SHARD1}_stats.json")
    assert f"{SHARD1}_stats.json: missing stats file (shard not committed)" in verify_dataset(s3_output_url)
