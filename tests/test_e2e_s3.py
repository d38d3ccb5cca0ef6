"""Output to s3:// on the moto server: the CLI with 2 actors on a local Ray session started after the server (so
the workers inherit its endpoint and credentials) writes a complete, readable dataset, byte-identical to a clean
run on local disk; inspect and verify read it back from S3."""

from __future__ import annotations

import fsspec
import pytest
import ray

from seediff.pipeline.cli import main
from tests.e2e_support import check_dataset, digests, reference_run, write_inputs


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
