"""Resume: what counts as committed, what is cleaned up, and the run.json check (refusal names the fields)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
import sys
from pathlib import Path

import fsspec
import pytest

from seediff.pipeline.resume import (
    LeaseHeld,
    NotAnOutputFolder,
    OutputLease,
    RunConfigMismatch,
    bind_device,
    check_output_folder,
    clean_leftovers,
    read_committed_stats,
    prepare_output,
    read_run_json,
)
from seediff.schemas.config import ConfigError
from seediff.schemas.manifest import Manifest
from tests.test_shards import ROWS, make_config, write_shard

MANIFEST = Manifest("classes.csv", ROWS, "ab" * 32)


def names(url: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.exists(root) else set()


def put(url: str, name: str, data: bytes) -> None:
    with fsspec.open(f"{url}/{name}", "wb") as f:
        f.write(data)


def test_only_parsable_stats_for_the_right_shard_count_and_the_rest_is_cleaned(storage_url: str) -> None:
    config = make_config(storage_url)
    write_shard(config, 0)
    stats0 = json.loads(fsspec.open(f"{storage_url}/seediff-000000_stats.json").open().read())
    put(storage_url, "seediff-000001.tar", b"truncated")
    put(storage_url, "seediff-000001_stats.json", b'{"shard_id": 1, "count"')  # cut off mid-write
    put(storage_url, "seediff-000002.parquet", b"x")
    put(storage_url, "seediff-000002_stats.json", json.dumps({"shard_id": 2}).encode())  # fields missing
    put(storage_url, "seediff-000003_stats.json", json.dumps(stats0).encode())  # says it is shard 0
    put(storage_url, "other-000004_stats.json", json.dumps(stats0 | {"shard_id": 4}).encode())  # another prefix
    put(storage_url, "notes.txt", b"user file")

    assert set(read_committed_stats(config)) == {0}
    removed = sorted(p.rsplit("/", 1)[-1] for p in clean_leftovers(config, set(read_committed_stats(config))))
    assert removed == [
        "seediff-000001.tar",
        "seediff-000001_stats.json",
        "seediff-000002.parquet",
        "seediff-000002_stats.json",
        "seediff-000003_stats.json",
    ]
    assert names(storage_url) == {
        "seediff-000000.tar",
        "seediff-000000.parquet",
        "seediff-000000_stats.json",
        "other-000004_stats.json",
        "notes.txt",
    }
    assert clean_leftovers(config, set(read_committed_stats(config))) == []


def test_nothing_to_resume_in_a_missing_root(tmp_path: Path) -> None:
    config = make_config(str(tmp_path / "absent"))
    assert set(read_committed_stats(config)) == set() and clean_leftovers(config, set()) == []


def test_first_start_writes_run_json_and_same_settings_resume(storage_url: str) -> None:
    config = make_config(storage_url)
    prepare_output(config, MANIFEST, overwrite=False)
    record = read_run_json(storage_url)
    assert record["manifest_sha256"] == MANIFEST.sha256 and record["num_samples"] == 6
    assert record["config"] == json.loads(config.to_json())
    prepare_output(config, MANIFEST, overwrite=False)  # resume: same settings


def test_resume_with_other_settings_is_refused_naming_the_fields(storage_url: str) -> None:
    prepare_output(make_config(storage_url), MANIFEST, overwrite=False)
    write_shard(make_config(storage_url), 0)  # run.json binds once a shard is committed
    changed = make_config(storage_url, steps=20, mask={"threshold": 0.4}, batch_size=8)
    other_manifest = Manifest("classes.csv", ROWS, "cd" * 32)
    expected = r"run\.json: .*differing fields: mask\.threshold, steps, manifest_sha256\."
    with pytest.raises(RunConfigMismatch, match=expected):
        prepare_output(changed, other_manifest, overwrite=False)


def test_same_manifest_bytes_with_other_resolved_counts_is_refused(tmp_path: Path) -> None:
    # a text manifest resumed with another --samples-per-class: same bytes, different plan
    prepare_output(make_config(str(tmp_path)), MANIFEST, overwrite=False)
    write_shard(make_config(str(tmp_path)), 0)
    recounted = Manifest("classes.csv", tuple(replace(r, num_samples=r.num_samples + 1) for r in ROWS), MANIFEST.sha256)
    with pytest.raises(RunConfigMismatch, match=r"differing fields: classes_sha256\."):
        prepare_output(make_config(str(tmp_path)), recounted, overwrite=False)


def test_before_any_commit_changed_settings_replace_run_json(storage_url: str) -> None:
    # a typo (--steps, --model) corrected before the first shard commits is not locked in
    prepare_output(make_config(storage_url, steps=20), MANIFEST, overwrite=False)
    put(storage_url, "seediff-000000.tar", b"half a shard of the typo run")
    prepare_output(make_config(storage_url, steps=3), MANIFEST, overwrite=False)
    assert read_run_json(storage_url)["config"]["steps"] == 3
    assert "seediff-000000.tar" not in names(storage_url)


def test_the_device_binds_once_a_shard_is_committed_unless_a_change_is_allowed(storage_url: str) -> None:
    config = make_config(storage_url)
    prepare_output(config, MANIFEST, overwrite=False)
    gpu, cpu = {"kind": "cuda", "dtype": "float16"}, {"kind": "cpu", "dtype": "float32"}
    bind_device(config, gpu, allow_change=False)
    assert read_run_json(storage_url)["device"] == gpu
    bind_device(config, cpu, allow_change=False)  # nothing committed yet: the new device simply replaces it
    assert read_run_json(storage_url)["device"] == cpu
    bind_device(config, gpu, allow_change=False)
    write_shard(config, 0)
    bind_device(config, gpu, allow_change=False)  # the same device resumes
    with pytest.raises(RunConfigMismatch, match=r"run\.json: this output was generated on cuda in float16; this run "
                       r"would use cpu in float32\. .* --allow-device-change"):
        bind_device(config, cpu, allow_change=False)
    assert read_run_json(storage_url)["device"] == gpu
    bind_device(config, cpu, allow_change=True)  # asked for explicitly: mixed fp16 and fp32 images from here on
    assert read_run_json(storage_url)["device"] == cpu


def test_the_same_root_under_another_url_resumes(tmp_path: Path) -> None:
    prepare_output(make_config(str(tmp_path)), MANIFEST, overwrite=False)
    prepare_output(make_config(f"file://{tmp_path}/"), MANIFEST, overwrite=False)


def test_shards_without_run_json_are_refused(tmp_path: Path) -> None:
    config = make_config(str(tmp_path))
    write_shard(config, 0)
    with pytest.raises(RunConfigMismatch, match="run.json: missing, but .* holds seediff-\\* shard files"):
        prepare_output(config, MANIFEST, overwrite=False)


def test_overwrite_deletes_only_seediff_files(storage_url: str) -> None:
    old = make_config(storage_url, shard_prefix="old", steps=10)
    prepare_output(old, MANIFEST, overwrite=False)
    write_shard(old, 0)
    for name in ("sizes.json", "dataset.json", ".old-000001.tar.tmp-abc123", "notes.txt"):
        put(storage_url, name, b"{}")
    new = make_config(storage_url)
    prepare_output(new, MANIFEST, overwrite=True)
    assert names(storage_url) == {"run.json", "notes.txt"}
    assert read_run_json(storage_url)["config"]["steps"] == new.steps


def test_unreadable_run_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"run\.json: not valid JSON"):
        prepare_output(make_config(str(tmp_path)), MANIFEST, overwrite=False)


def test_a_child_process_reaches_the_same_s3_server(s3_output_url: str) -> None:
    """The moto endpoint and credentials are in os.environ, so processes started later (Ray workers) see them."""
    config = make_config(s3_output_url)
    write_shard(config, 0)
    code = (
        "import sys; from seediff.pipeline.resume import read_committed_stats; from seediff.schemas.config import RunConfig; "
        "print(sorted(read_committed_stats(RunConfig.model_validate_json(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, config.model_dump_json()],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[0]"


def test_a_second_driver_is_refused_naming_the_holder_and_a_stale_lease_is_taken_over(storage_url: str) -> None:
    first = OutputLease(storage_url, "run-first")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match=r"lease\.json: this output is in use by run run-first on "):
            OutputLease(storage_url, "run-second").acquire()
    finally:
        first._stop.set()  # the first driver dies: no more heartbeats, the lease file stays behind
    assert OutputLease(storage_url, "run-third", stale_s=60).read()["run_id"] == "run-first"
    with pytest.raises(LeaseHeld):
        OutputLease(storage_url, "run-third", stale_s=60).acquire()  # still fresh
    taker = OutputLease(storage_url, "run-third", stale_s=0.0)  # everything older than now is stale
    taker.acquire()
    assert taker.read()["run_id"] == "run-third"
    taker.release()
    assert taker.read() is None


def test_a_folder_with_the_users_own_files_or_a_file_is_not_an_output(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "dataset.json").write_text('{"theirs": true}')
    with pytest.raises(NotAnOutputFolder, match=r"not a seediff output \(no run.json\) .* holds dataset.json"):
        prepare_output(make_config(str(folder)), MANIFEST, overwrite=True)  # --overwrite does not make it ours
    assert names(str(folder)) == {"dataset.json"}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotAnOutputFolder, match="afile: is a file"):
        check_output_folder(make_config(str(tmp_path / "afile")), overwrite=False)


@pytest.mark.parametrize("body", ["[]", '"x"', '{"heartbeat": "abc"}', '{"heartbeat": null}', '{"heartbeat": Infinity}'])
def test_a_lease_of_the_wrong_type_is_taken_over(body: str, tmp_path: Path, caplog) -> None:
    (tmp_path / "lease.json").write_text(body)
    lease = OutputLease(str(tmp_path), "run-new")
    lease.acquire()
    try:
        assert lease.read()["run_id"] == "run-new"
        assert any("taking over the lease" in r.getMessage() for r in caplog.records)
    finally:
        lease.release()


def test_a_future_heartbeat_locks_only_until_the_lease_file_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "lease.json"
    path.write_text(json.dumps({"run_id": "planted", "host": "elsewhere", "pid": 1, "heartbeat": 1e12}))
    with pytest.raises(LeaseHeld) as held:
        OutputLease(str(tmp_path), "run-new").acquire()
    message = str(held.value)
    assert "in the future, clock skew?" in message and "written 0s ago" in message and "\n" not in message
    old = time.time() - 120  # written two minutes ago and never refreshed: stale
    os.utime(path, (old, old))
    lease = OutputLease(str(tmp_path), "run-new")
    lease.acquire()
    assert lease.read()["run_id"] == "run-new"
    lease.release()
