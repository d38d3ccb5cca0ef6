"""ShardWriter on local disk, memory:// and s3:// (moto over HTTP): read back with webdataset, byte-identical
rewrites, and the commit protocol (a crash between tar and stats leaves a shard resume redoes)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import stat
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from seediff.pipeline.plan import Plan
from seediff.pipeline.resume import clean_leftovers, read_committed_stats
from seediff.schemas.config import RunConfig
from seediff.schemas.manifest import class_row
from seediff.schemas.records import SampleSpec, ShardSpec, shard_name
from seediff.schemas.records import decode_mask
from seediff import storage
from seediff.workers.encode import GeneratedImage, LabelledSample, encode_sample
from seediff.workers.shards import ShardWriter

SIZE = 64
ROWS = (
    class_row("cat", 3, 3, "a photograph of a cat", "", 1),
    class_row("dog", 7, 3, "a dog on grass", "blurry", 2),
)
FAILING = {2: "nsfw: blanked by the safety checker"}  # sample id -> error


def make_config(output_url: str, **overrides) -> RunConfig:
    return RunConfig(output_url=output_url, samples_per_shard=4, resolution=SIZE, **overrides)


def synthetic(spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """A seed-determined image and a label map: a rectangle of the class id whose size depends on the sample, with
    an ignore (255) rim."""
    image = np.random.default_rng(spec.seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    labels[7 : 17 + 4 * spec.index_in_class, 3:41] = 255
    labels[8 : 16 + 4 * spec.index_in_class, 4:40] = spec.class_id
    return image, labels


def outcomes(shard: ShardSpec, config: RunConfig):
    for spec in Plan(ROWS, config.seed, config.samples_per_shard).samples(shard):
        image, labels = synthetic(spec)
        error = FAILING.get(spec.sample_id)
        stats = {"foreground_fraction": float((labels == spec.class_id).mean())}
        yield encode_sample(LabelledSample(GeneratedImage(spec, image), labels, mask_stats=stats, error=error), config)


def write_shard(config: RunConfig, shard_id: int, runtime_info: dict | None = None) -> dict:
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(shard_id)
    with ShardWriter(config, shard) as writer:
        for outcome in outcomes(shard, config):
            writer.add(outcome)
        return writer.commit(runtime_info or {"actor": "test"})


def shard_bytes(config: RunConfig, shard_id: int, suffix: str) -> bytes:
    name = shard_name(config.shard_prefix, shard_id, config.shard_digits)
    return fsspec.open(f"{config.output_url}/{name}{suffix}", "rb").open().read()


def local_tar(config: RunConfig, shard_id: int, tmp_path: Path) -> str:
    """webdataset reads local paths; shards on memory:// or s3:// are fetched first."""
    path = tmp_path / f"shard-{shard_id}.tar"
    path.write_bytes(shard_bytes(config, shard_id, ".tar"))
    return str(path)


def test_shard_reads_back_with_webdataset(storage_url: str, tmp_path: Path) -> None:
    config = make_config(storage_url)
    stats = write_shard(config, 0)
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(0)
    expected = {o.spec.key: o for o in outcomes(shard, config) if o.status == "success"}

    samples = list(wds.WebDataset(local_tar(config, 0, tmp_path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(expected) == ["000000000000", "000000000001", "000000000003"]
    for s in samples:
        outcome = expected[s["__key__"]]
        assert set(s) - {"__url__", "__local_path__"} == {"__key__", "jpg", "mask.png", "cls", "txt", "json"}
        assert s["jpg"] == outcome.image  # the pre-encoded bytes, not re-encoded by webdataset
        assert s["mask.png"] == outcome.mask
        class_id = outcome.spec.class_id
        _, labels = synthetic(outcome.spec)
        np.testing.assert_array_equal(decode_mask(s["mask.png"]), labels)
        assert s["cls"] == str(class_id).encode()
        assert s["txt"].decode() == outcome.spec.prompt.text
        assert json.loads(s["json"]) == outcome.metadata

    table = pq.read_table(io.BytesIO(shard_bytes(config, 0, ".parquet"))).to_pylist()
    assert [r["sample_id"] for r in table] == [0, 1, 2, 3]
    assert [r["status"] for r in table] == ["success", "success", "failed", "success"]
    assert table[2]["error"] == FAILING[2] and table[2]["image_bytes"] is None
    assert table[3]["class_name"] == "dog" and table[3]["width"] == SIZE and table[3]["shard"] == 0

    assert (stats["count"], stats["successes"], stats["failures"]) == (4, 3, 1)
    assert stats["failures_by_reason"] == {"nsfw": 1}
    assert stats["tar_bytes"] == len(shard_bytes(config, 0, ".tar"))
    assert stats["parquet_bytes"] == len(shard_bytes(config, 0, ".parquet"))
    assert stats["runtime"] == {"actor": "test"} and stats["host"]
    assert json.loads(shard_bytes(config, 0, "_stats.json")) == stats
    assert set(read_committed_stats(config)) == {0}


def test_last_shard_is_short_and_tar_is_ustar_with_fixed_mtime(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    assert write_shard(config, 1)["count"] == 2  # 6 samples, 4 per shard
    data = (tmp_path / "seediff-000001.tar").read_bytes()
    assert data[257:265] == b"ustar\x0000"  # POSIX USTAR magic + version of the first header
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {0}
    assert [m.name for m in members][:5] == [f"000000000004.{f}" for f in ("cls", "jpg", "json", "mask.png", "txt")]


def test_rewriting_a_shard_gives_identical_tar_and_parquet(storage_url: str) -> None:
    config = make_config(storage_url)
    first = write_shard(config, 0, {"attempt": 1})
    before = {s: shard_bytes(config, 0, s) for s in (".tar", ".parquet")}
    second = write_shard(config, 0, {"attempt": 2})
    assert {s: shard_bytes(config, 0, s) for s in (".tar", ".parquet")} == before
    assert second["runtime"] == {"attempt": 2} and first["tar_bytes"] == second["tar_bytes"]


@pytest.mark.parametrize("crash_in", ["_publish_parquet", "_publish_stats"])
def test_crash_before_stats_leaves_a_shard_resume_redoes(
    storage_url: str, crash_in: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(storage_url)
    write_shard(config, 0)
    fs, root = fsspec.core.url_to_fs(storage_url)
    committed_files = sorted(fs.ls(root, detail=False))

    def crash(self, *args):
        raise OSError("injected crash")

    monkeypatch.setattr(ShardWriter, crash_in, crash)
    with pytest.raises(OSError, match="injected"):
        write_shard(config, 1)
    monkeypatch.undo()

    left = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} - {p.rsplit("/", 1)[-1] for p in committed_files}
    expected_left = {"seediff-000001.tar"} | ({"seediff-000001.parquet"} if crash_in == "_publish_stats" else set())
    assert left == expected_left  # published before the crash, and nothing else (no temp files)
    assert set(read_committed_stats(config)) == {0}
    assert sorted(p.rsplit("/", 1)[-1] for p in clean_leftovers(config, set(read_committed_stats(config)))) == sorted(expected_left)
    assert sorted(fs.ls(root, detail=False)) == committed_files
    assert write_shard(config, 1)["count"] == 2 and set(read_committed_stats(config)) == {0, 1}


def test_killed_writer_leaves_only_a_temp_file_that_resume_removes(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(0)
    writer = ShardWriter(config, shard)  # no `with`, no commit: as if the process died mid-shard
    writer.add(next(outcomes(shard, config)))
    (temp,) = [p.name for p in tmp_path.iterdir()]
    assert temp.startswith(".seediff-000000.tar.tmp-")
    assert set(read_committed_stats(config)) == set()
    assert [Path(p).name for p in clean_leftovers(config, set(read_committed_stats(config)))] == [temp]
    assert list(tmp_path.iterdir()) == []


def test_uploads_staged_by_a_killed_process_are_swept_live_ones_kept(
    s3_output_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # local outputs stage next to the final path, where resume's clean_leftovers removes them; object-store uploads
    # stage on the worker's disk, one folder per process
    monkeypatch.setattr(storage, "STAGING_ROOT", tmp_path / "staging")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = storage.STAGING_ROOT / gone.stdout.strip()  # a process that has exited, as an actor killed mid-upload
    dead.mkdir(parents=True)
    (dead / ".seediff-000007.tar.tmp-0a").write_bytes(b"half an upload")
    config = make_config(s3_output_url)
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(0)
    mine = storage.STAGING_ROOT / str(os.getpid())
    with ShardWriter(config, shard) as writer:  # this process is uploading now
        for outcome in outcomes(shard, config):
            writer.add(outcome)
        assert [p.name.startswith(".seediff-000000.tar.tmp-") for p in mine.iterdir()] == [True]
        assert storage.sweep_staging() == [dead]
        assert not dead.exists() and len(list(mine.iterdir())) == 1
        writer.commit({"actor": "test"})
    assert list(mine.iterdir()) == []
    assert storage.sweep_staging() == []  # the live process's (empty) folder stays


def test_leaving_the_writer_without_commit_publishes_nothing(storage_url: str) -> None:
    config = make_config(storage_url)
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(0)
    with pytest.raises(RuntimeError, match="generation failed"), ShardWriter(config, shard) as writer:
        writer.add(next(outcomes(shard, config)))
        raise RuntimeError("generation failed")
    fs, root = fsspec.core.url_to_fs(storage_url)
    assert not fs.exists(root) or fs.ls(root, detail=False) == []


def test_writer_refuses_out_of_order_and_incomplete_shards(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    shard = Plan(ROWS, config.seed, config.samples_per_shard).shard(0)
    first, second, *_ = outcomes(shard, config)
    with ShardWriter(config, shard) as writer:
        with pytest.raises(ValueError, match="expected sample 0, got 1"):
            writer.add(second)
        writer.add(first)
        with pytest.raises(ValueError, match="commit after 1 of 4 samples"):
            writer.commit({})
    assert list(tmp_path.iterdir()) == []



def test_a_retried_writer_sweeps_the_temp_files_of_its_shard_only(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    plan = Plan(ROWS, config.seed, config.samples_per_shard)
    for shard_id in (0, 1):  # writers killed mid-shard
        ShardWriter(config, plan.shard(shard_id)).add(next(outcomes(plan.shard(shard_id), config)))
    assert len(list(tmp_path.glob(".seediff-*.tmp-*"))) == 2
    with ShardWriter(config, plan.shard(0), retry=True) as writer:
        (left,) = [p.name for p in tmp_path.glob(".seediff-*.tmp-*") if p.name != Path(writer._tar_file.temp_path).name]
        assert left.startswith(".seediff-000001.tar.tmp-")
        for outcome in outcomes(plan.shard(0), config):
            writer.add(outcome)
        writer.commit({})
    assert [p.name for p in tmp_path.glob(".*")] == [left]  # shard 1's waits for its own retry or the run's end


def test_staging_and_log_folders_are_the_users_own(tmp_path: Path) -> None:
    mine = storage.private_dir(tmp_path / "staging")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700 and mine.stat().st_uid == os.geteuid()
    assert storage.STAGING_ROOT.name.startswith("seediff-staging-")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, os.geteuid() + 1, -1)  # the suite runs as root: a folder another user created first
    with pytest.raises(storage.StorageAccessError, match="not a folder of this user's"):
        storage.private_dir(theirs)
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(storage.StorageAccessError):
        storage.private_dir(link)
