"""End to end on one local Ray session: miniature Flux.1- and SD3-shaped pipelines saved with save_pretrained and
loaded by path run `seediff generate` at 192x128 with a class table and a 2-class scene table; every mask holds only
0, the sample's ids and 255; verify passes; run.json and every sample record the family and its blocks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import ray
import webdataset as wds
from PIL import Image

from seediff.pipeline.cli import main
from seediff.schemas.records import decode_mask

TABLES = {
    "classes": "class_name,num_samples,prompt\ndog,1,a photo of a dog\ncat,1,a cat on a sofa\n",
    "scenes": "prompt,num_samples\na {dog} chasing a {cat} on grass,2\n",
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("table", ["classes", "scenes"])
def test_generate_end_to_end_on_mmdits(saved_mmdits, tmp_path, capsys, family, table):
    manifest = tmp_path / "m.csv"
    manifest.write_text(TABLES[table])
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    config_file.write_text("mask: {pamr_iterations: 5}\n")
    rc = main(["generate", str(manifest), "--out", str(out), "--model", saved_mmdits[family], "--steps", "2",
               "--width", "192", "--height", "128", "--samples-per-shard", "2", "--num-actors", "1", "--device", "cpu",
               "--config", str(config_file)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 samples written" in captured.out

    run = json.loads((out / "run.json").read_text())["config"]
    assert (run["family"], run["width"], run["height"]) == (family, 192, 128)
    blocks = {"flux": [0, 1], "sd3": [1]}[family]
    assert (run["layers"]["cascade"], run["layers"]["cross_blocks"], run["layers"]["self_block"]) == ([2, 1], blocks,
                                                                                                      1)
    samples = list(wds.WebDataset(str(out / "seediff-000000.tar"), shardshuffle=False))
    assert len(samples) == 2
    for sample in samples:
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        mask = decode_mask(sample["mask.png"])
        assert image.shape == (128, 192, 3) and mask.shape == (128, 192)
        meta = json.loads(sample["json"])
        ids = {c["class_id"] for c in meta["classes"]}
        assert len(ids) == (2 if table == "scenes" else 1)
        assert set(np.unique(mask).tolist()) <= {0, 255, *ids}
        assert (meta["family"], meta["layers_cross_blocks"], meta["layers_self_block"]) == (family, blocks, 1)
        assert all(c["num_cross_maps"] == len(blocks) * c["tokens"] for c in meta["classes"])
    assert main(["verify", str(out)]) == 0
