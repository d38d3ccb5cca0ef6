"""Fixtures: miniature random-weight MM-DiT pipelines (Flux.1-schnell-shaped: double- and single-stream blocks, RoPE,
CLIP pooled + T5; SD3.5-shaped: joint blocks with RMS qk-norms, CLIP-L + CLIP-G + T5), offline tokenizers, saved
with save_pretrained and loaded by path through the normal loader. Everything runs on the CPU in fp32."""

from __future__ import annotations

import pytest
import torch

from seediff.schemas.config import RunConfig
from seediff.workers.models import build_tiny_mmdit, load_model

MMDIT_FAMILIES = ("flux", "sd3")


@pytest.fixture(scope="session")
def saved_mmdits(tmp_path_factory) -> dict[str, str]:
    """family -> folder of its miniature pipeline, written by save_pretrained."""
    root = tmp_path_factory.mktemp("mmdits")
    for name in MMDIT_FAMILIES:
        build_tiny_mmdit(name).save_pretrained(root / name)
    return {name: str(root / name) for name in MMDIT_FAMILIES}


@pytest.fixture(scope="session")
def mmdit_pipes(saved_mmdits) -> dict:
    """family -> its saved miniature pipeline, loaded by path (family recognised from its config files)."""
    return {name: load_model(RunConfig(model=path), torch.device("cpu")) for name, path in saved_mmdits.items()}
