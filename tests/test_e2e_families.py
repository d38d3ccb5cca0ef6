"""End to end on one local Ray session per model family and aspect ratio: miniature SD 2-base, SD 2.1-768
(v-prediction, upcast attention), SDXL and SD1.x pipelines saved with save_pretrained and loaded by path run
`seediff generate`; images and masks have the requested shape; run.json and every sample record the family and the
layers the masks were read from."""

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

MANIFEST = "class_name,num_samples,prompt\ndog,1,a photo of a dog\ncat,1,a cat on a sofa\n"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


CASES = [  # (saved model, extra flags, expected (width, height), family, cascade)
    ("sd2-base", [], (128, 128), "sd2", [2, 1, 0]),  # the model's native size
    ("sd21-768", [], (192, 192), "sd2", [2, 1, 0]),
    ("sdxl", ["--resolution", "128"], (128, 128), "sdxl", [2, 1]),
    ("sdxl", ["--width", "128", "--height", "192"], (128, 192), "sdxl", [2, 1]),  # 2:3
    ("sdxl", ["--width", "512", "--height", "288"], (512, 288), "sdxl", [2, 1]),  # 16:9
    ("sd1", ["--width", "128", "--height", "192"], (128, 192), "sd1", [2, 1, 0]),  # 2:3
    ("sd1", ["--width", "320", "--height", "192"], (320, 192), "sd1", [2, 1, 0]),  # 5:3, wide (the unit is 64 px)
]


@pytest.mark.parametrize("name,flags,size,family,cascade", CASES, ids=[f"{c[0]}-{c[2][0]}x{c[2][1]}" for c in CASES])
def test_generate_end_to_end(saved_models, tmp_path, capsys, name, flags, size, family, cascade):
    manifest = tmp_path / "m.csv"
    manifest.write_text(MANIFEST)
    out = tmp_path / "out"
    argv = ["generate", str(manifest), "--out", str(out), "--model", saved_models[name], "--steps", "2",
            "--samples-per-shard", "2", "--num-actors", "1", "--device", "cpu", *flags]
    config_file = tmp_path / "run.yaml"
    config_file.write_text("mask: {pamr_iterations: 5}\n")
    rc = main([*argv, "--config", str(config_file)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 samples written" in captured.out

    run = json.loads((out / "run.json").read_text())["config"]
    assert (run["family"], run["width"], run["height"], run["layers"]["cascade"]) == (family, *size, cascade)
    samples = list(wds.WebDataset(str(out / "seediff-000000.tar"), shardshuffle=False))
    assert len(samples) == 2
    for sample in samples:
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        mask = decode_mask(sample["mask.png"])
        assert image.shape == (size[1], size[0], 3) and mask.shape == (size[1], size[0])
        meta = json.loads(sample["json"])
        assert (meta["family"], meta["width"], meta["height"], meta["layers_cascade"]) == (family, *size, cascade)
        (cls,) = meta["classes"]
        assert cls["num_cross_maps"] > 0
        assert ("otsu_middle" in cls) == (len(cascade) == 3) and "otsu_fine" in cls
    assert main(["verify", str(out)]) == 0
