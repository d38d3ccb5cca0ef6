"""Stable Diffusion 1.5's UNet, built from its published architecture with random weights, for benchmarks: random
weights cost exactly what trained weights cost in time and memory, and nothing is downloaded.

SD15_UNET is runwayml/stable-diffusion-v1-5 unet/config.json (the same UNet as SD1.4), every field spelled out so a
change of diffusers defaults cannot change the benchmarked model."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name: SD1.x's number of heads (diffusers issue #2011)
)
SD15_RESOLUTION = 512
SD15_LATENT = SD15_RESOLUTION // 8  # the VAE downsamples by 8
SD15_TEXT_TOKENS = 77  # CLIP ViT-L/14 context length
SD15_TEXT_DIM = SD15_UNET["cross_attention_dim"]


def build_sd15_unet(
    device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0
) -> UNet2DConditionModel:
    """The SD1.5 UNet with seeded random weights on ``device``. On "meta" no memory is allocated: shapes and the
    module structure only, enough to count bytes and locate layers."""
    with torch.random.fork_rng(devices=[]), torch.device(device):  # the caller's CPU RNG is left untouched
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
    return unet.to(dtype=dtype).eval()
