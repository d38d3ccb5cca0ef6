"""End to end on one local Ray session (2 CPUs) with the tiny model: the CLI with 2 actors writes every planned
sample exactly once; an actor killed mid-shard and a shard past its timeout are retried and the output is
byte-identical to a clean run; a dry run loads no model and starts no Ray; a changed setting on resume is refused."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import tarfile
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyarrow.parquet as pq
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

import seediff
from seediff.pipeline.cli import main
from seediff.pipeline.dispatch import DispatchError
from seediff.pipeline.resume import OutputLease
from seediff.pipeline.run import run_generation
from seediff.schemas.config import RunConfig, RuntimeOptions
from seediff.schemas.manifest import load_manifest
from seediff.schemas.records import STATS_SUFFIX
from tests.e2e_support import (
    HANG_GUARD_S,
    REPO,
    SETTINGS,
    check_dataset,
    cli_command,
    cli_env,
    digests,
    reference_run,
    run_config,
    stats_files,
    write_inputs,
)
from seediff.workers.actor import ShardActor
from seediff.workers.shards import ShardWriter

NUM_SAMPLES = 9
FAULTY_SHARD = 1


class DiesMidShard(ShardActor):
    """Test-only: on the first attempt of FAULTY_SHARD (no marker file yet), the process exits after writing one
    sample of it, like a machine or OOM kill in the middle of a shard."""

    def generate_shard(self, shard, attempt=1):
        marker = Path(self.config.output_url).parent / "died-once"
        if shard.shard_id == FAULTY_SHARD and not marker.exists():
            marker.write_text(str(os.getpid()))
            add, written = ShardWriter.add, itertools.count(1)

            def add_then_die(writer, outcome):
                add(writer, outcome)
                if next(written) == 1:
                    os._exit(1)

            ShardWriter.add = add_then_die  # this actor process only
        return super().generate_shard(shard, attempt)


class StallsOnce(ShardActor):
    """Test-only: the first attempt of FAULTY_SHARD hangs (a stuck GPU, a dead NFS mount)."""

    def generate_shard(self, shard, attempt=1):
        marker = Path(self.config.output_url).parent / "stalled-once"
        if shard.shard_id == FAULTY_SHARD and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(3600)
        return super().generate_shard(shard, attempt)


class DeviceFault(ShardActor):
    """Test-only: every UNet call raises the sticky CUDA error of a broken device (C2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def broken(*_, **__):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        self.pipe.unet.forward = broken


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the module (tests/plugins/local_ray.py)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Digests of a clean run (plain actor, no Ray)."""
    manifest, _ = inputs
    return reference_run(manifest, str(tmp_path_factory.mktemp("reference") / "out"))


def test_cli_two_actors_every_sample_once(inputs, reference, tmp_path, capsys, caplog):
    manifest, config = inputs
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="seediff.pipeline.dispatch")
    rc = main(["generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "meaningless" in captured.err  # the tiny model says what it is
    assert "9 samples written" in captured.out
    check_dataset(out, NUM_SAMPLES)
    assert digests(out) == reference
    # Two actors start; shards go only to actors that are ready, so which commits what depends on their start-up
    # times: the first one ready may commit all five 0.3 s shards before the other has loaded its model.
    assert "2 CPU actors to start" in caplog.text
    assert 1 <= len({s["runtime"]["actor_id"] for s in stats_files(out).values()}) <= 2
    assert main(["verify", str(out)]) == 0


def test_python_api_summary_matches_the_files(inputs, reference, tmp_path):
    manifest, _ = inputs
    out = tmp_path / "out"
    summary = seediff.generate(
        str(manifest), out, config=RunConfig(**SETTINGS), runtime=RuntimeOptions(num_actors=2, device="cpu"),
        progress=io.StringIO(),
    )
    assert isinstance(summary, seediff.RunSummary) and summary.ok
    assert digests(out) == reference
    stats = stats_files(out)
    assert summary.samples_written == summary.dataset_samples == NUM_SAMPLES
    assert summary.samples_failed == sum(s["failures"] for s in stats.values()) == 0
    assert (summary.shards_generated, summary.shards_skipped, summary.failed_shards) == (5, 0, ())
    assert summary.tar_bytes == sum(p.stat().st_size for p in out.glob("*.tar"))
    assert summary.parquet_bytes == sum(p.stat().st_size for p in out.glob("*.parquet"))
    assert summary.paths["dataset_json"] == str(out / "dataset.json")
    assert summary.paths["run_json"] == str(out / "run.json")
    assert sum(a.samples for a in summary.actors.values()) == NUM_SAMPLES
    assert seediff.verify(out) == []
    assert seediff.inspect(out)["samples"] == NUM_SAMPLES
    again = seediff.resume(out, progress=io.StringIO())  # nothing left to do: every shard is kept
    assert (again.shards_generated, again.shards_skipped, again.dataset_samples) == (0, 5, NUM_SAMPLES)
    assert digests(out) == reference


def test_actor_killed_mid_shard_is_retried_byte_identical(inputs, reference, tmp_path):
    manifest, _ = inputs
    out = tmp_path / "out"
    runtime = RuntimeOptions(num_actors=2, device="cpu")
    outcome = run_generation(load_manifest(manifest), run_config(str(out)), runtime, actor_class=DiesMidShard)
    assert (tmp_path / "died-once").exists()
    assert outcome.ok and outcome.retried_shards == {FAULTY_SHARD: 2}
    check_dataset(out, NUM_SAMPLES)
    assert digests(out) == reference
    assert not list(out.glob(".*")), "the killed actor's temp files are swept by the retry and the run's end"


def test_shard_past_timeout_is_requeued_and_completes(inputs, reference, tmp_path):
    manifest, _ = inputs
    out = tmp_path / "out"
    runtime = RuntimeOptions(num_actors=2, device="cpu", shard_timeout_s=5)
    outcome = run_generation(load_manifest(manifest), run_config(str(out)), runtime, actor_class=StallsOnce)
    assert (tmp_path / "stalled-once").exists()
    assert outcome.ok and outcome.retried_shards.get(FAULTY_SHARD, 0) >= 2
    check_dataset(out, NUM_SAMPLES)
    assert digests(out) == reference


def test_changed_setting_on_resume_is_refused(inputs, tmp_path, capsys):
    manifest, config = inputs
    out = tmp_path / "out"
    base = ["generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2"]
    assert main(base) == 0
    before = digests(out)
    capsys.readouterr()
    assert main([*base, "--steps", "3", "--resolution", "128"]) == 2
    err = capsys.readouterr().err
    assert "differing fields: height, resolution, steps, width" in err  # the size as resolved: width x height
    assert err.count("\n") <= 2  # the tiny-model note and one error line, no traceback
    assert digests(out) == before
    # runtime options are not output settings: a resume with other actors/retries is accepted
    assert main([*base, "--num-actors", "1", "--max-attempts", "5"]) == 0
    assert digests(out) == before


def test_dry_run_loads_no_model_and_starts_no_ray(inputs, tmp_path):
    manifest, config = inputs
    out = tmp_path / "out"
    probe = (
        "import sys; from seediff.pipeline.cli import main; "
        f"rc = main(['generate', {str(manifest)!r}, '--out', {str(out)!r}, '--config', {str(config)!r}, '--dry-run']); "
        "loaded = [m for m in ('seediff.workers.models', 'diffusers', 'ray') if m in sys.modules]; "
        "print('LOADED', loaded); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout
    assert "9 samples in 5 shards" in done.stdout
    assert "to generate: 5 shards, 9 samples" in done.stdout
    assert "key 000000000000" in done.stdout and "seed " in done.stdout and "estimated output" in done.stdout
    assert not out.exists()  # a dry run writes nothing


def test_bad_manifest_exits_2_with_file_line_field(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("class_name,num_samples\ncat,3\ndog,lots\n")
    done = subprocess.run(
        cli_command("generate", str(bad), "--out", str(tmp_path / "out"), "--model", "tiny"),
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2
    error_lines = [ln for ln in done.stderr.splitlines() if ln.startswith("seediff: error:")]
    assert len(error_lines) == 1 and "bad.csv:3" in error_lines[0] and "num_samples" in error_lines[0]
    assert "Traceback" not in done.stderr


def test_sample_error_becomes_a_failed_row_and_its_shard_commits(tmp_path):
    # The byte-level test tokenizer makes one token per character: "zebra" lies past the 77-token window, a
    # deterministic error of that sample alone. It shares shard 2 (interleaved: ids 2, 5) and a batch with a cat
    # sample.
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"class_name,num_samples,prompt\ncat,5,a photo of a cat\nzebra,1,{'a very long photo ' * 6}of a zebra\n")
    out = tmp_path / "out"
    outcome = run_generation(load_manifest(manifest), run_config(str(out)), RuntimeOptions(num_actors=1, device="cpu"))
    assert outcome.shards_generated == 3 and outcome.samples_failed == 1 and outcome.failures_by_stage == {"prompt": 1}
    assert not outcome.ok and "1 of 6 samples failed" in outcome.format()  # 17% > --max-failed-fraction 0.01
    assert seediff.verify(out) == []
    stats = stats_files(out)[2]
    assert (stats["count"], stats["successes"], stats["failures"]) == (2, 1, 1)
    rows = pq.read_table(out / "seediff-000002.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["success", "failed"]
    assert rows[1]["key"] == "000000000005" and rows[1]["error"].startswith("prompt: manifest line 3 (sample 5)")
    assert "past the text encoder's 77 tokens" in rows[1]["error"]
    assert [s["__key__"] for s in wds.WebDataset(str(out / "seediff-000002.tar"), shardshuffle=False)] == ["000000000002"]


def test_device_fault_commits_nothing_and_the_same_command_then_completes(inputs, reference, tmp_path):
    manifest, _ = inputs
    out = tmp_path / "out"
    runtime = RuntimeOptions(num_actors=2, device="cpu")
    with pytest.raises(DispatchError, match="shards failed alike, none completed: RuntimeError: CUDA error"):
        run_generation(load_manifest(manifest), run_config(str(out)), runtime, actor_class=DeviceFault)
    assert stats_files(out) == {} and not list(out.glob("*.tar"))  # no shard committed, no failed rows
    outcome = run_generation(load_manifest(manifest), run_config(str(out)), runtime)
    assert outcome.ok and outcome.samples_written == NUM_SAMPLES
    check_dataset(out, NUM_SAMPLES)
    assert digests(out) == reference


def test_second_driver_on_the_same_output_exits_3_naming_the_first(inputs, tmp_path, capsys):
    manifest, config = inputs
    out = tmp_path / "out"
    with OutputLease(str(out), "driver-one"):  # a live driver holds the output, heartbeat running
        rc = main(["generate", str(manifest), "--out", str(out), "--config", str(config)])
    assert rc == 3  # retry later: not bad input
    err = capsys.readouterr().err
    assert "in use by run driver-one on" in err and "Traceback" not in err
    assert not (out / "run.json").exists()  # refused before touching anything


def test_flipped_bytes_are_reported_by_verify_and_repaired_byte_identical(inputs, reference, tmp_path, capsys):
    manifest, config = inputs
    out = tmp_path / "out"
    base = ["generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2"]
    assert main(base) == 0
    tar_path = out / "seediff-000001.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(tar_path.read_bytes())
    middle = member.offset_data + member.size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])  # same size, still a valid tar
    tar_path.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["verify", str(out)]) == 1
    key = member.name.split(".")[0]
    assert f"seediff-000001.tar: sample {key}: jpg sha256" in capsys.readouterr().out
    assert main(["verify", "--repair", str(out)]) == 1
    assert "un-committed 1 shards (1)" in capsys.readouterr().out
    assert not (out / "seediff-000001_stats.json").exists()
    with counting_stats_reads() as reads:
        assert main(base) == 0  # the resume: 4 shards committed, 1 to generate
    assert sorted(reads) == sorted({p.name for p in out.glob("*_stats.json")} - {"seediff-000001_stats.json"})
    assert digests(out) == reference
    assert main(["verify", str(out)]) == 0


@contextlib.contextmanager
def counting_stats_reads():
    """The ``*_stats.json`` files the driver opens (the actors write theirs in other processes), by name, in order:
    a run reads each committed stats file once (one GET each on an object store) and passes the stats along."""
    reads: list[str] = []
    real = LocalFileSystem._open

    def _open(self, path, mode="rb", *args, **kwargs):
        if str(path).endswith(STATS_SUFFIX) and "r" in mode:
            reads.append(Path(path).name)
        return real(self, path, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalFileSystem, "_open", _open)
        yield reads


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 96 KiB tmpfs (this suite runs as root in its container): room for run.json, the lease and a few shards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_stops_the_run_early_with_one_message(inputs, small_tmpfs, capsys):
    manifest, config = inputs
    out = small_tmpfs / "out"
    rc = main(["generate", str(manifest), "--out", str(out), "--config", str(config), "--num-actors", "2",
               "--samples-per-shard", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("seediff: error:")]
    assert len(errors) == 1 and "run stopped" in errors[0] and "No space left on device" in errors[0], err
    stats = list(out.glob("*_stats.json"))
    assert len(stats) < 9  # stopped before every shard was tried (and retried) against the full disk
    for path in stats:  # what was committed is intact
        assert json.loads(path.read_text())["count"] == 1


def _sample_fields(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> field -> bytes of every sample in an output's tars."""
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for tar in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)}


def test_old_contiguous_output_resumes_verifies_and_its_samples_equal_any_other_layout(inputs, reference, tmp_path):
    # An output written before the layout was recorded (run.json without shard_layout: contiguous id ranges, here
    # 4-sample shards), interrupted after its first shard: resume expands the same ranges and verify passes. Each
    # sample's bytes equal those of the same sample in an interleaved run with another shard size.
    manifest, _ = inputs
    old, mixed = tmp_path / "old" / "out", tmp_path / "mixed" / "out"
    contiguous = {**SETTINGS, "samples_per_shard": 4, "shard_layout": "contiguous"}
    complete = reference_run(manifest, str(old), contiguous)
    record = json.loads((old / "run.json").read_text())
    del record["config"]["shard_layout"]
    (old / "run.json").write_text(json.dumps(record))
    for name in ("seediff-000001_stats.json", "seediff-000002_stats.json", "seediff-000002.tar"):
        (old / name).unlink()  # what a killed driver leaves: shard 0 committed, shard 1 staged, shard 2 not started
    again = seediff.resume(old, RuntimeOptions(num_actors=1, device="cpu"), progress=io.StringIO())
    assert again.ok and (again.shards_generated, again.shards_skipped) == (2, 1)
    assert digests(old) == complete and seediff.verify(old) == []
    assert [[s["__key__"] for s in wds.WebDataset(str(old / f"seediff-00000{i}.tar"), shardshuffle=False)]
            for i in range(3)] == [[f"{i:012d}" for i in ids] for ids in (range(0, 4), range(4, 8), range(8, 9))]
    reference_run(manifest, str(mixed), {**SETTINGS, "samples_per_shard": 3})  # interleaved: ids s, s+3, s+6
    assert [s["__key__"] for s in wds.WebDataset(str(mixed / "seediff-000001.tar"), shardshuffle=False)] == [
        "000000000001", "000000000004", "000000000007"]
    assert _sample_fields(mixed) == _sample_fields(old)
