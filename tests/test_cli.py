"""The CLI's settings (config file + flags), its input errors (exit 2, one line naming the source), the progress
log line and the run summary. No Ray, no model: everything here runs before or after dispatch."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from seediff.pipeline.cli import build_parser, main, settings
from seediff.pipeline.dispatch import DispatchResult, ShardRecord
from seediff.pipeline.progress import Progress
from seediff.pipeline.summary import RunSummary
from seediff.schemas.config import RuntimeOptions
from tests.e2e_support import HANG_GUARD_S, REPO, cli_env


def parse(*argv: str):
    return build_parser().parse_args(["generate", "m.csv", *argv])


def test_flags_override_config_file_and_split_runtime_options(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: tiny\nsteps: 7\nseed: 3\nmask: {pamr_iterations: 9}\nmax_attempts: 5\nnum_actors: 4\n")
    config, runtime, per_class = settings(
        parse("--out", "rel/out", "--config", str(config_file), "--steps", "2", "--num-actors", "2", "--samples-per-class", "6")
    )
    assert (config.model, config.steps, config.seed, config.mask.pamr_iterations) == ("tiny", 2, 3, 9)
    assert (runtime.max_attempts, runtime.num_actors) == (5, 2)
    assert per_class == 6
    assert config.output_url == os.path.abspath("rel/out")  # Ray workers do not share the driver's cwd
    config, _, _ = settings(parse("--out", "s3://bucket/out"))
    assert config.output_url == "s3://bucket/out"


def test_unknown_config_key_exits_2_naming_file_and_key(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("class_name,num_samples\ncat,2\n")
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: tiny\nstepz: 3\n")
    rc = main(["generate", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--config", str(config_file)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{config_file}:2: stepz" in err and "Traceback" not in err


def test_bad_flag_value_exits_2(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("class_name,num_samples\ncat,2\n")
    assert main(["generate", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--resolution", "65"]) == 2
    assert "--resolution: Input should be a multiple of 8 (got 65)" in capsys.readouterr().err


def test_progress_log_line_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=10, done=4, stream=stream, log_every_s=0)
    progress.shard_done(ShardRecord(shard_id=2, num_samples=3, attempts=1, stats={}, actor_id="a", run_s=1.0))
    progress.shard_done(ShardRecord(shard_id=3, num_samples=3, attempts=3, error="boom"))
    progress.tick()
    assert stream.getvalue().startswith("progress: 7/10 samples (70.0%)")
    assert "1 failed shards" in stream.getvalue()


def test_summary_lists_actors_and_failed_shards():
    stats = {"successes": 3, "failures": 1, "tar_bytes": 1000, "parquet_bytes": 500, "host": "node-a"}
    ok = ShardRecord(0, 4, attempts=1, stats=stats, actor_id="abcdef0123", run_s=2.0)
    bad = ShardRecord(1, 4, attempts=3, error="actor died: oom")
    index = {"committed_shards": 3, "num_samples": 9, "sizes_json": "o/sizes.json", "dataset_json": "o/dataset.json"}
    summary = RunSummary.from_dispatch("o", DispatchResult({0: ok, 1: bad}, wall_s=4.0), 2, index, {})
    assert (summary.samples_written, summary.samples_failed, summary.bytes_written, summary.ok) == (3, 1, 1500, False)
    text = summary.format()
    assert "3 samples written, 1 failed" in text
    assert "1 shards generated, 2 already committed, 1 failed" in text
    assert "1.5 KiB written" in text  # the binary units of `inspect`
    assert "1.00 img/s overall" in text and "includes starting Ray and the actors" in text
    assert "actor abcdef01 on node-a: 2.00 img/s (4 samples in 2.0 s)" in text
    assert "FAILED shard 1 after 3 attempts: actor died: oom" in text


def test_module_entrypoint_for_ray_job_submit():
    done = subprocess.run(
        [sys.executable, "-m", "seediff", "generate", "--help"], cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0 and "--dry-run" in done.stdout and "--address" in done.stdout


def test_dry_run_of_a_1e8_sample_manifest_peaks_under_300_mb(tmp_path):
    # 100 classes x 10^6 samples: the dry run counts shards from the plan's ranges, never a set of sample ids. Peak
    # RSS from VmHWM (this process only; ru_maxrss would carry the forking pytest process's size across exec).
    manifest = tmp_path / "big.csv"
    manifest.write_text("class_name,num_samples\n" + "".join(f"class{i},{10**6}\n" for i in range(100)))
    probe = (
        "import sys; from seediff.pipeline.cli import main; "
        f"rc = main(['generate', {str(manifest)!r}, '--out', {str(tmp_path / 'out')!r}, '--model', 'tiny', '--dry-run']); "
        "print('PEAK_KB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert "100000000 samples in 100000 shards" in done.stdout
    peak_mb = int(done.stdout.split("PEAK_KB")[1].split()[0]) / 1024
    assert peak_mb < 300, f"dry run peaked at {peak_mb:.0f} MB"


def test_version_names_seediff_and_the_libraries_behind_its_bytes(capsys):
    import pytest

    import seediff

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"seediff {seediff.__version__} (diffusers ") and "torch " in line and "ray " in line
    assert "\n" not in line


def test_annotate_dry_run_plans_checks_classes_and_writes_nothing(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(images / f"{i}.png")
    out = tmp_path / "labelled"
    argv = ["annotate", str(images), "--out", str(out), "--model", "tiny", "--resolution", "64", "--dry-run"]
    assert main([*argv, "--classes", "dog,cat", "--samples-per-shard", "2"]) == 0
    text = capsys.readouterr().out
    assert f"input: {images} (3 files, 3 images; classes: dog, cat)" in text
    assert "3 samples in 2 shards" in text and "to generate: 2 shards, 3 samples" in text
    assert not out.exists()
    assert main([*argv, "--classes-field", "labels"]) == 2  # images without json hold no class list
    assert not out.exists()


def test_a_missing_manifest_is_a_manifest_error_before_the_model_is_looked_up(tmp_path, capsys):
    missing = tmp_path / "classes.csv"
    argv = ["generate", str(missing), "--out", str(tmp_path / "o"), "--model", "no-such-org/no-such-model"]
    assert main(argv) == 2 and main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{missing}: manifest file not found") == 2 and "model" not in err


def test_the_summary_times_the_whole_call_and_names_its_log(tmp_path):
    import time

    from seediff.api import quiet

    log = tmp_path / "run.log"
    index = {"committed_shards": 0, "num_samples": 0, "sizes_json": "o/sizes.json", "dataset_json": "o/dataset.json"}
    with quiet("generate", False, log) as (stream, finished):
        time.sleep(0.3)  # checks and starting Ray, before the dispatch
        summary = finished(RunSummary.from_dispatch("o", DispatchResult({}, wall_s=0.01), 0, index, {}))
    assert summary.wall_s >= 0.3 and summary.paths["log"] == str(log)


def test_the_dry_runs_size_estimate_is_within_1_5x_of_the_written_size(tmp_path):
    """Across 64, 256 and 512 px: the estimate before anything is committed against one written shard of 2 samples."""
    import re

    from seediff import api
    from seediff.pipeline.resume import prepare_output
    from seediff.workers.actor import ShardActor
    from tests.e2e_support import plan_of

    manifest_file = tmp_path / "m.csv"
    manifest_file.write_text("class_name,num_samples\ncat,1\ndog,1\n")
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    ratios = {}
    for size in (64, 256, 512):
        out = tmp_path / str(size)
        config = {"model": "tiny", "resolution": size, "steps": 2, "batch_size": 2, "mask": {"pamr_iterations": 5}}
        text = api.dry_run(str(manifest_file), out, config)
        number, unit = re.search(r"estimated output: ([\d.]+) (\w+)", text).groups()
        run_config, manifest = api._inputs(str(manifest_file), out, config, None)
        prepare_output(run_config, manifest, overwrite=False)
        plan = plan_of(manifest, run_config)
        actor = ShardActor(run_config, RuntimeOptions(device="cpu"), plan, torch_threads=1)
        stats = actor.generate_shard(plan.shard(0))
        ratios[size] = float(number) * units[unit] / (stats["tar_bytes"] + stats["parquet_bytes"])
    print("estimate / written:", ratios)
    assert all(1 / 1.5 <= r <= 1.5 for r in ratios.values()), ratios
