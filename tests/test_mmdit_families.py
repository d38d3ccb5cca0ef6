"""MM-DiT family rows (flux, sd3): recognised from model_index.json + transformer/config.json before any weights load,
their size unit (VAE factor x patch x cascade poolings) and block choice, refusals by name of the MM-DiTs without a
row, and dry runs on copies whose weight files are garbage: valid sizes accepted, invalid ones refused with exit 2,
without Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from seediff.schemas.config import ConfigError, LayerChoice, RunConfig
from seediff.workers import families
from seediff.workers.families import read_model_files, recognise, resolve
from tests.test_families import dry_run


def test_saved_mmdits_are_recognised_with_their_unit_and_blocks(saved_mmdits):
    flux, sd3 = (recognise(read_model_files(saved_mmdits[n])) for n in ("flux", "sd3"))
    assert (flux.family.name, flux.family.pipeline, flux.unit, flux.family.cfg) == ("flux", "FluxPipeline", 64, False)
    assert (flux.layers.cascade, flux.layers.cross_blocks, flux.layers.self_block) == ((2, 1), (0, 1), 1)
    assert (sd3.family.name, sd3.family.pipeline, sd3.unit, sd3.native_size) == ("sd3", "StableDiffusion3Pipeline", 64,
                                                                                  128)
    assert (sd3.layers.cross_blocks, sd3.layers.self_block) == ((1,), 1)


def _files(pipeline: str, components: tuple[str, ...], transformer: dict) -> families.ModelFiles:
    index = {"_class_name": pipeline, **{c: ["diffusers", "X"] for c in components}}
    return families.ModelFiles("cfg", index, None, {"block_out_channels": [128, 256, 512, 512]}, {}, transformer)


def test_full_size_configs_give_the_published_blocks():
    flux = recognise(_files("FluxPipeline", families.family("flux").components,
                            {"_class_name": "FluxTransformer2DModel", "in_channels": 64, "num_layers": 19,
                             "num_single_layers": 38}))
    sd3 = recognise(_files("StableDiffusion3Pipeline", families.family("sd3").components,
                           {"_class_name": "SD3Transformer2DModel", "in_channels": 16, "num_layers": 24,
                            "sample_size": 128, "patch_size": 2}))
    assert (flux.unit, flux.native_size, flux.layers.cross_blocks, flux.layers.self_block) == (64, 1024,
                                                                                               (15, 16, 17, 18), 12)
    assert (sd3.unit, sd3.native_size, sd3.layers.cross_blocks, sd3.layers.self_block) == (64, 1024, (8, 9, 10, 11), 9)
    # Flux Fill / Control transformers take image channels: refused by what they are
    with pytest.raises(ConfigError, match="FluxTransformer2DModel of 384 input channels .*Fill, Control"):
        recognise(_files("FluxPipeline", families.family("flux").components,
                         {"_class_name": "FluxTransformer2DModel", "in_channels": 384}))


@pytest.mark.parametrize("pipeline,name", [
    ("Flux2Pipeline", "Flux.2"), ("QwenImagePipeline", "Qwen-Image"), ("PixArtSigmaPipeline", "PixArt-Sigma"),
    ("PixArtAlphaPipeline", "PixArt-alpha"), ("HiDreamImagePipeline", "HiDream"), ("SanaPipeline", "SANA"),
    ("FluxFillPipeline", "inpainting"), ("StableDiffusion3ControlNetPipeline", "ControlNet"),
    ("FluxControlNetPipeline", "ControlNet"), ("StableDiffusionInpaintPipeline", "inpainting"),
])
def test_mmdits_without_a_row_are_refused_by_name(pipeline, name):
    with pytest.raises(ConfigError, match=rf"pipeline {pipeline} \(.*{name}.*\) is not supported yet"):
        recognise(_files(pipeline, ("transformer", "vae"), {"_class_name": "X"}))


def test_layer_overrides_unit_and_refusals(saved_mmdits):
    path = saved_mmdits["flux"]
    config, found = resolve(RunConfig(model=path, width=192, height=128, layers=LayerChoice(cascade=(1, 0),
                                                                                            cross_blocks=(2, 3))))
    assert (config.layers.cascade, config.layers.cross_blocks, config.layers.self_block, found.unit) == ((1, 0), (2, 3),
                                                                                                        1, 32)
    with pytest.raises(ConfigError, match=r"layers: blocks \[7\] are not in the transformer .* blocks 0-3"):
        resolve(RunConfig(model=path, layers=LayerChoice(self_block=7)))
    with pytest.raises(ConfigError, match="scheduler: euler is a UNet scheduler"):
        resolve(RunConfig(model=path, scheduler="euler", resolution=128))
    with pytest.raises(ConfigError, match="layers: cross_blocks and self_block name MM-DiT blocks"):
        resolve(RunConfig(model="tiny", layers=LayerChoice(self_block=1)))


@pytest.fixture(scope="module")
def garbage_copies(saved_mmdits, tmp_path_factory) -> dict[str, str]:
    """Copies of the saved MM-DiTs whose weight files are garbage (configs intact): a dry run must not read them."""
    root = tmp_path_factory.mktemp("garbage")
    copies = {}
    for name, path in saved_mmdits.items():
        shutil.copytree(path, root / name)
        weights = [p for p in (root / name).rglob("*") if p.suffix in (".safetensors", ".bin")]
        assert weights
        for p in weights:
            p.write_bytes(b"not weights")
        copies[name] = str(root / name)
    return copies


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_dry_run_on_garbage_weights_accepts_valid_sizes_and_refuses_others(garbage_copies, name, tmp_path):
    ok = dry_run(tmp_path, "--model", garbage_copies[name], "--width", "192", "--height", "128")
    assert ok.returncode == 0, ok.stderr
    assert f"family {name}; 192x128 px; SeeDiff cascade at depths [2, 1] below the image-token grid" in ok.stdout
    assert "LOADED []" in ok.stdout
    bad = dry_run(tmp_path, "--model", garbage_copies[name], "--width", "160", "--height", "128")
    assert bad.returncode == 2, bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("seediff: error:")]
    assert len(errors) == 1 and "width: 160 px is not a multiple of 64 px" in errors[0], bad.stderr
    assert "nearest valid: 128 or 192" in errors[0] and "LOADED []" in bad.stdout and "Traceback" not in bad.stderr


def test_dry_run_refuses_flux2_by_name(tmp_path):
    folder = tmp_path / "flux2"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline",
                                                         "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    done = dry_run(tmp_path, "--model", str(folder))
    assert done.returncode == 2 and "pipeline Flux2Pipeline (Flux.2) is not supported yet" in done.stderr, done.stderr
    assert "LOADED []" in done.stdout
