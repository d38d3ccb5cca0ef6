"""Fixtures: a tiny random-weight SD1.x pipeline (attention at latent, latent/2, latent/4; offline tokenizer), an
SD2-style variant (other head counts, linear projections, upcast attention, wider text encoder), run configs and
sample specs for them. Everything runs on the CPU in fp32."""

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
def make_specs() -> Callable[..., list[SampleSpec]]:
    """make_specs([(class_name, prompt), ...], seeds) -> one SampleSpec per entry (class ids 1, 2, ...)."""

    def make(entries: Sequence[tuple[str, str]], seeds: Sequence[int]) -> list[SampleSpec]:
        rows = [class_row(name, i + 1, 1, prompt, "", i + 1) for i, (name, prompt) in enumerate(entries)]
        return [SampleSpec(i, i, 0, seed, row) for i, (row, seed) in enumerate(zip(rows, seeds))]

    return make
