"""Fixtures: a tiny random-weight SD1.x pipeline (attention at latent, latent/2, latent/4; offline tokenizer), an
SD2-style variant (other head counts, linear projections, upcast attention, wider text encoder), miniature SD 2-base,
SD 2.1-768 (v-prediction, upcast attention, 1.5x the base's native size) and SDXL (two text encoders, added time ids,
attention at latent/2 and latent/4 only) pipelines saved with save_pretrained, run configs and sample specs for them.
Everything runs on the CPU in fp32."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from seediff.schemas.config import MaskConfig, RunConfig
from seediff.schemas.manifest import class_row
from seediff.schemas.records import SampleSpec
from seediff.workers.models import TINY_MODEL, build_tiny_model, load_model

# SD2-base differs from SD1.x in per-level head counts, linear in/out projections and its text width.
SD2_STYLE_UNET = dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True)
SD2_STYLE_TEXT = dict(hidden_size=48, num_attention_heads=4)
# The families in miniature, as build_tiny_model keyword arguments. SD 2.1-768 is SD 2-base's layout with upcast
# attention, v-prediction and a native size 1.5x the base's (128 -> 192 px here, 512 -> 768 for the real ones).
SD2_BASE = dict(unet_overrides={**SD2_STYLE_UNET, "upcast_attention": False}, text_overrides=SD2_STYLE_TEXT)
SD21_768 = dict(
    unet_overrides={**SD2_STYLE_UNET, "sample_size": 24},
    text_overrides=SD2_STYLE_TEXT,
    scheduler_overrides={"prediction_type": "v_prediction"},
)
# SDXL's layout: no attention at the latent level, attention at latent/2 and latent/4 (more transformer layers at
# latent/4), linear projections; head dims as in SDXL's 5/10/20 heads scaled down.
SDXL = dict(
    xl=True,
    unet_overrides=dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 16, 32),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
    ),
)
FAMILY_SHAPES = {"sd1": {}, "sd2-base": SD2_BASE, "sd21-768": SD21_768, "sdxl": SDXL}


@pytest.fixture(scope="session")
def tiny_run_config() -> RunConfig:
    """64 px (latent 8: attention at 8, 4 and 2), 2 steps with guidance, short PAMR."""
    return RunConfig(
        model=TINY_MODEL,
        resolution=64,
        steps=2,
        guidance_scale=6.0,
        batch_size=4,
        mask=MaskConfig(pamr_iterations=5),
    )


@pytest.fixture(scope="session")
def tiny_pipe(tiny_run_config):
    return load_model(tiny_run_config, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_sd2_pipe():
    pipe = build_tiny_model(unet_overrides=SD2_STYLE_UNET, text_overrides=SD2_STYLE_TEXT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, str]:
    """name -> folder of a miniature pipeline of each family, written by save_pretrained, to load by path."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, shape in FAMILY_SHAPES.items():
        build_tiny_model(**shape).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="session")
def family_pipes(saved_models) -> dict:
    """name -> each saved miniature pipeline, loaded by path through the normal loader (family recognised from its
    config files)."""
    return {name: load_model(RunConfig(model=path), torch.device("cpu")) for name, path in saved_models.items()}


@pytest.fixture(scope="session")
def make_specs() -> Callable[..., list[SampleSpec]]:
    """make_specs([(class_name, prompt), ...], seeds) -> one SampleSpec per entry (class ids 1, 2, ...)."""

    def make(entries: Sequence[tuple[str, str]], seeds: Sequence[int]) -> list[SampleSpec]:
        rows = [class_row(name, i + 1, 1, prompt, "", i + 1) for i, (name, prompt) in enumerate(entries)]
        return [SampleSpec(i, i, 0, seed, row) for i, (row, seed) in enumerate(zip(rows, seeds))]

    return make
