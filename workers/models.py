"""Load a diffusers Stable Diffusion pipeline: a hub id or local path, or ``tiny`` (a miniature random-weight SD1.x
with attention at latent, latent/2 and latent/4, and an offline byte-level CLIP tokenizer) for tests and benches."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from seediff.schemas.config import TINY_MODEL, RunConfig
from seediff.tokens import offline_clip_tokenizer

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# SD1.x layout in miniature: three cross-attention levels (latent, latent/2, latent/4) and a plain bottom level.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads in SD1.x-style UNets
)
# Downsampling factor 8 like SD's VAE (three downsamplers), so resolution / 8 = latent side.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=77,
    vocab_size=1000,
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r}, expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(config: RunConfig, device: torch.device) -> StableDiffusionPipeline:
    dtype = resolve_dtype(config.dtype, device)
    if config.model == TINY_MODEL:
        pipe = build_tiny_model()  # built in fp32; casting to the same dtype only makes diffusers warn
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        # The safety checker stays as the model ships it; flagged samples become failures in generate.py.
        pipe = StableDiffusionPipeline.from_pretrained(config.model, revision=config.revision, torch_dtype=dtype)
    if config.scheduler != "default":
        pipe.scheduler = SCHEDULERS[config.scheduler].from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_model(pipe: StableDiffusionPipeline, mode: str) -> None:
    """torch.compile the UNet and the VAE decoder in place (the modules keep their identity, so the pipeline and its
    attention processors still reach them): whole graphs (a graph break is an error, not a silent slow path) and
    static shapes (batch size and resolution are fixed by the run config). ``mode``: torch.compile's; "default",
    "reduce-overhead" (CUDA graphs) or "max-autotune". Compilation itself happens on the first call."""
    options = dict(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    pipe.unet.compile(**options)
    pipe.vae.decoder.compile(**options)


def build_tiny_model(
    unet_overrides: dict[str, Any] | None = None,
    text_overrides: dict[str, Any] | None = None,
    vae_overrides: dict[str, Any] | None = None,
) -> StableDiffusionPipeline:
    """A deterministic random-weight SD pipeline (same weights on every call). Overrides change the UNet, text
    encoder or VAE config, e.g. an SD2-style variant with other head counts and linear projections, or full-size
    SD1.5 shapes for benchmarks."""
    text_cfg = {**TINY_TEXT, **(text_overrides or {})}
    unet_cfg = {**TINY_UNET, "cross_attention_dim": text_cfg["hidden_size"], **(unet_overrides or {})}
    tokenizer = offline_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(0)
        vae = AutoencoderKL(**{**TINY_VAE, **(vae_overrides or {})})
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **text_cfg,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
