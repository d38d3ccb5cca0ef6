"""Output to s3:// on the moto server: the CLI with 2 actors on a local Ray session started after the server (so
the workers inherit its endpoint and credentials) writes a complete, readable dataset, byte-identical to a clean
run on local disk; inspect and verify read it back from S3. An outage of the server mid-run is absorbed by the
dispatcher's backoff; a missing bucket or missing credentials exit 2 at validation, naming the URL."""

from __future__ import annotations

import logging
import threading
import time

import fsspec
import pytest
import ray

from seediff.pipeline.cli import main
from tests.e2e_support import HANG_GUARD_S, SETTINGS, check_dataset, digests, reference_run, write_inputs


@pytest.fixture(scope="module")
def ray_after_moto(moto_s3):
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_generate_to_s3(ray_after_moto, s3_output_url, tmp_path, capsys):
    manifest, config = write_inputs(tmp_path / "inputs")
    reference = reference_run(manifest, str(tmp_path / "reference" / "out"))
    rc = main(["generate", str(manifest), "--out", s3_output_url, "--config", str(config), "--num-actors", "2"])
    assert rc == 0, capsys.readouterr().err
    local = tmp_path / "downloaded"
    fs, root = fsspec.core.url_to_fs(s3_output_url)
    fs.get(root + "/", str(local), recursive=True)
    check_dataset(local, 9)
    assert digests(local) == reference
    assert main(["verify", s3_output_url]) == 0
    assert main(["inspect", s3_output_url]) == 0


def test_an_s3_outage_mid_run_is_absorbed_by_backoff(ray_after_moto, s3_output_url, s3_outage, tmp_path, caplog):
    settings = {**SETTINGS, "samples_per_shard": 1}  # 9 shards: most are written after the outage begins
    manifest, config = write_inputs(tmp_path / "inputs", settings)
    reference = reference_run(manifest, str(tmp_path / "reference" / "out"), settings)
    fs, root = fsspec.core.url_to_fs(s3_output_url)
    restarted: list[threading.Thread] = []

    def outage_after_first_commit() -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            fs.invalidate_cache()
            if fs.exists(root) and fs.glob(f"{root}/*_stats.json"):
                restarted.append(s3_outage(20.0))  # longer than s3fs's and botocore's own retries
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=outage_after_first_commit, daemon=True)
    watcher.start()
    with caplog.at_level(logging.WARNING, logger="seediff.pipeline.dispatch"):
        rc = main(["generate", str(manifest), "--out", s3_output_url, "--config", str(config), "--num-actors", "2"])
    watcher.join()
    assert restarted, "no outage happened"
    restarted[0].join()
    assert rc == 0
    assert "transient error" in caplog.text  # the dispatcher backed off and retried, not the store client alone
    local = tmp_path / "downloaded"
    fs.invalidate_cache()
    fs.get(root + "/", str(local), recursive=True)
    assert digests(local) == reference


def test_missing_bucket_and_missing_credentials_exit_2_at_validation(moto_s3, tmp_path, capsys, monkeypatch):
    manifest, config = write_inputs(tmp_path / "inputs")
    url = "s3://no-such-bucket-seediff/out"
    for extra in ([], ["--dry-run"]):
        assert main(["generate", str(manifest), "--out", url, "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert f"seediff: error: {url}: the bucket 'no-such-bucket-seediff' does not exist" in err
        assert "Traceback" not in err
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    try:
        assert main(["generate", str(manifest), "--out", "s3://any-bucket/out", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "seediff: error: s3://any-bucket/out: no credentials found" in err and "Traceback" not in err
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
