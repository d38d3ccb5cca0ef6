"""The Python API's input checks: bad input raises the typed error (``file:line: field`` for a manifest) before Ray
or any model code is imported, and the facade exports the API."""

from __future__ import annotations

import subprocess
import sys

import seediff
from tests.e2e_support import HANG_GUARD_S, REPO, SETTINGS, cli_env, write_inputs

PROBE = """
import sys, seediff
try:
    seediff.{call}
except seediff.InputError as e:
    print("ERROR", type(e).__name__, e)
print("LOADED", [m for m in ("ray", "diffusers", "torch", "seediff.workers.models") if m in sys.modules])
"""


def probe(call: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(call=call)], cwd=REPO, env=cli_env(), capture_output=True, text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bad_manifest_raises_manifest_error_with_file_line_field_before_ray(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("class_name,num_samples\ncat,3\ndog,lots\n")
    out = probe(f"generate({str(bad)!r}, {str(tmp_path / 'out')!r}, config={{'model': 'tiny'}})")
    assert f"ERROR ManifestError {bad}:3: num_samples" in out
    assert "LOADED []" in out
    assert not (tmp_path / "out").exists()


def test_bad_setting_and_changed_setting_raise_typed_errors_before_ray(tmp_path):
    manifest, _ = write_inputs(tmp_path / "inputs")
    out = probe(f"generate({str(manifest)!r}, 'o', config={{'stepz': 3}})")
    assert "ERROR ConfigError config: stepz: Extra inputs are not permitted" in out and "LOADED []" in out
    # an output started with other settings is refused before Ray starts, naming the fields
    out_dir = tmp_path / "out"
    seediff.dry_run(manifest, out_dir, config=SETTINGS)  # writes nothing
    assert not out_dir.exists()
    from seediff.pipeline.resume import prepare_output
    from seediff.schemas.config import RunConfig
    from seediff.schemas.manifest import load_manifest
    from seediff.schemas.records import ShardStats
    from seediff.workers.families import resolve

    # run.json as a run writes it: the config resolved against the model (family, size, layers)
    config, _ = resolve(RunConfig(**SETTINGS, output_url=str(out_dir)))
    prepare_output(config, load_manifest(manifest), overwrite=False)
    # run.json binds once a shard is committed: a stats file (the commit marker) of shard 0
    stats = ShardStats(0, "seediff-000000", 2, 2, 0, {}, 0, 0, 0.0, 0.0, 0.0, "host", {}, {})
    (out_dir / "seediff-000000_stats.json").write_text(stats.to_json())
    out = probe(f"generate({str(manifest)!r}, {str(out_dir)!r}, config={{**{SETTINGS!r}, 'steps': 3}})")
    assert "ERROR RunConfigMismatch" in out and "differing fields: steps" in out and "LOADED []" in out
    out = probe(f"inspect({str(tmp_path / 'nothing')!r})")
    assert "ERROR NotAnOutputError" in out and "run.json: missing" in out


def test_facade_exports_the_api():
    for name in ("generate", "resume", "dry_run", "inspect", "verify", "preview", "RunSummary", "InputError"):
        assert name in dir(seediff) and getattr(seediff, name) is not None


def test_a_plan_with_more_shards_than_shard_digits_can_number_is_refused(tmp_path):
    manifest = tmp_path / "eleven.csv"
    manifest.write_text("class_name,num_samples\ncat,11\n")  # 11 one-sample shards: ids 0..10 need 2 digits
    settings = {**SETTINGS, "samples_per_shard": 1, "shard_digits": 1}
    out = probe(f"dry_run({str(manifest)!r}, {str(tmp_path / 'out')!r}, config={settings!r})")
    assert "ERROR ConfigError --shard-digits: 1 digits number at most 10 shards, the plan has 11" in out
    assert "LOADED []" in out
