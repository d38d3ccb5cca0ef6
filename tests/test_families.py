"""Model families recognised from config files before any weights load: the family table, the size unit derived from
the UNet, layer choices, and refusals (unsupported pipelines, inpainting UNets, refiners, bad sizes, layer choices a
UNet cannot serve) with exit 2 during the dry run, without Ray or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, Transformer2DModel

from seediff.schemas.config import TINY_MODEL, ConfigError, LayerChoice, RunConfig
from seediff.workers import families
from seediff.workers.families import TINY_VAE, read_model_files, recognise, resolve
from tests.e2e_support import HANG_GUARD_S, REPO, cli_env

MANIFEST = "class_name,num_samples,prompt\ndog,2,a photo of a dog\n"


def recognised(path: str) -> families.Recognised:
    return recognise(read_model_files(path))


def test_family_table_recognises_each_saved_pipeline(saved_models):
    expected = {  # name -> (family, pipeline, size unit, native size, prediction type, cascade)
        "sd1": ("sd1", "StableDiffusionPipeline", 64, 128, "epsilon", (2, 1, 0)),
        "sd2-base": ("sd2", "StableDiffusionPipeline", 64, 128, "epsilon", (2, 1, 0)),
        "sd21-768": ("sd2", "StableDiffusionPipeline", 64, 192, "v_prediction", (2, 1, 0)),
        "sdxl": ("sdxl", "StableDiffusionXLPipeline", 32, 128, "epsilon", (2, 1)),
    }
    for name, path in saved_models.items():
        found = recognised(path)
        assert (found.family.name, found.family.pipeline, found.unit, found.native_size, found.prediction_type,
                found.layers.cascade) == expected[name], name
        assert found.layers.seed_blocks == ("down", "up") and found.layers.expand_layer == 0
    assert recognise(read_model_files(TINY_MODEL)).family.name == "sd1"


def test_full_size_configs_give_the_documented_units_and_cascades():
    """SD1.5, SD2.1-768 and SDXL's published UNet layouts (only the fields recognition reads)."""
    sd = dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4)
    xl = dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
              addition_embed_type="text_time", use_linear_projection=True, sample_size=128)
    vae = {"block_out_channels": [128, 256, 512, 512]}
    index = {"_class_name": "StableDiffusionPipeline", **{c: ["x", "y"] for c in ("unet", "vae", "text_encoder", "tokenizer")}}
    xl_index = {**index, "_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["x", "y"], "tokenizer_2": ["x", "y"]}
    sd15 = recognise(families.ModelFiles("sd15", index, {**sd, "sample_size": 64}, vae, {}))
    sd21 = recognise(families.ModelFiles("sd21", index, {**sd, "sample_size": 96, "use_linear_projection": True},
                                         vae, {"prediction_type": "v_prediction"}))
    sdxl = recognise(families.ModelFiles("sdxl", xl_index, xl, vae, {}))
    assert (sd15.family.name, sd15.unit, sd15.native_size, sd15.layers.cascade) == ("sd1", 64, 512, (2, 1, 0))
    assert (sd21.family.name, sd21.unit, sd21.native_size, sd21.prediction_type) == ("sd2", 64, 768, "v_prediction")
    assert (sdxl.family.name, sdxl.unit, sdxl.native_size, sdxl.layers.cascade) == ("sdxl", 32, 1024, (2, 1))


def test_resolve_fills_family_size_and_layers():
    config, found = resolve(RunConfig(model=TINY_MODEL))
    assert (config.family, config.width, config.height, config.layers) == ("sd1", 128, 128, found.layers)
    config, _ = resolve(RunConfig(model=TINY_MODEL, resolution=128, height=192))
    assert config.size == (128, 192)
    assert resolve(config)[0] == config  # idempotent: a resumed run compares equal configs
    override = LayerChoice(cascade=(2, 1), seed_blocks=("up",))
    assert resolve(RunConfig(model=TINY_MODEL, resolution=64, layers=override))[0].layers == override


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"resolution": 72}, r"^resolution: 72 px is not a multiple of 64 px, .*sd1 .*nearest valid: 64 or 128"),
        ({"width": 128, "height": 200}, r"^height: 200 px is not a multiple of 64 px.*nearest valid: 192 or 256"),
        ({"family": "sdxl"}, r"^family: the config says sdxl, but tiny is sd1"),
        ({"layers": {"cascade": [3, 2]}}, r"lacks attention SeeDiff reads: .*decoder self-attention at depth 3"),
        ({"layers": {"cascade": [2, 1], "seed_blocks": ["mid"]}}, r"cross-attention in mid blocks at depth 2"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve(RunConfig.model_validate({"model": TINY_MODEL, **settings}))


def test_sdxl_unit_is_derived_from_its_unet(saved_models):
    with pytest.raises(ConfigError, match=r"^width: 144 px is not a multiple of 32 px.*sdxl.*nearest valid: 128 or 160"):
        resolve(RunConfig(model=saved_models["sdxl"], width=144, height=128))
    assert resolve(RunConfig(model=saved_models["sdxl"], width=160, height=96))[0].size == (160, 96)


def write_pipeline_files(folder, index: dict, unet: dict | None = None) -> str:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
    return str(folder)


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory, saved_models) -> dict[str, str]:
    """name -> a pipeline folder seediff must refuse."""
    root = tmp_path_factory.mktemp("unsupported")
    transformer = Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, norm_type="ada_norm_zero", num_embeds_ada_norm=10, norm_num_groups=2,
    )
    DiTPipeline(transformer=transformer, vae=AutoencoderKL(**TINY_VAE), scheduler=DDIMScheduler()).save_pretrained(
        root / "dit"
    )
    def read(name: str, file: str) -> dict:
        return json.loads((Path(saved_models[name]) / file).read_text())

    sd1, index, xl_index = read("sd1", "unet/config.json"), read("sd1", "model_index.json"), read("sdxl", "model_index.json")
    return {
        "dit": str(root / "dit"),
        "inpainting": write_pipeline_files(root / "inpaint", {**index, "_class_name": "StableDiffusionPipeline"},
                                           {**sd1, "in_channels": 9}),
        "refiner": write_pipeline_files(root / "refiner", {**xl_index, "text_encoder": [None, None],
                                                           "tokenizer": [None, None]}, sd1),
        "no-attention": write_pipeline_files(root / "flat", index, {**sd1, "up_block_types": ["UpBlock2D"] * 4}),
    }


@pytest.mark.parametrize(
    "name,message",
    [
        ("dit", r"pipeline DiTPipeline is not supported \(a transformer \(DiT/MMDiT\), no UNet\); supported "
                r"pipelines: FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline"),
        ("inpainting", r"StableDiffusionPipeline with a UNet2DConditionModel of 9 input channels \(an inpainting"),
        ("refiner", r"StableDiffusionXLPipeline is missing text_encoder, tokenizer \(an SDXL refiner"),
        ("no-attention", r"its UNet lacks attention SeeDiff reads: .*decoder self-attention at depth 2"),
    ],
)
def test_unsupported_models_are_refused_naming_the_pipeline_and_what_is_missing(unsupported, name, message):
    with pytest.raises(ConfigError, match=message):
        resolve(RunConfig(model=unsupported[name]))


def test_single_file_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"is a single file; .*from_single_file"):
        resolve(RunConfig(model=str(checkpoint)))


def dry_run(tmp_path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``seediff generate --dry-run`` in a fresh interpreter that reports whether diffusers, torch or Ray loaded."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(MANIFEST)
    argv = ["generate", str(manifest), "--out", str(tmp_path / "out"), "--dry-run", *flags]
    probe = (
        "import sys; from seediff.pipeline.cli import main; "
        f"rc = main({argv!r}); "
        "print('LOADED', [m for m in ('diffusers', 'torch', 'ray') if m in sys.modules]); sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=cli_env(**(env or {})), capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def test_dry_run_refuses_an_unsupported_pipeline_and_a_bad_size_with_exit_2_without_ray(unsupported, saved_models,
                                                                                        tmp_path):
    for flags, message in [
        (["--model", unsupported["dit"]], "pipeline DiTPipeline is not supported"),
        (["--model", saved_models["sdxl"], "--width", "144"], "width: 144 px is not a multiple of 32 px"),
    ]:
        done = dry_run(tmp_path, *flags)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("seediff: error:")]
        assert len(errors) == 1 and message in errors[0], done.stderr
        assert "LOADED []" in done.stdout and "Traceback" not in done.stderr
    ok = dry_run(tmp_path, "--model", saved_models["sd21-768"], "--width", "128", "--height", "192")
    assert ok.returncode == 0, ok.stderr
    assert "family sd2; 128x192 px; SeeDiff cascade at depths [2, 1, 0]" in ok.stdout and "LOADED []" in ok.stdout


def test_unreachable_hub_model_is_an_input_error(tmp_path):
    done = dry_run(tmp_path, "--model", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    assert "model: cannot read model_index.json of 'nobody/no-such-model' from the hub" in done.stderr
    # without HF_HUB_OFFLINE, a hub whose host does not resolve (no network) is read from the cache alone, at once:
    # no five retries per file
    done = dry_run(tmp_path, "--model", "nobody/no-such-model", env={"HF_ENDPOINT": "https://hub.invalid"})
    assert done.returncode == 2, done.stderr
    assert "cannot read model_index.json of 'nobody/no-such-model' from the hub: not cached and offline" in done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
