"""Stable Diffusion UNets (1.5, and the other families: 2-base, 2.1-768, XL base), built from their published
architectures with random weights, for benchmarks: random weights cost exactly what trained weights cost in time and
memory, and nothing is downloaded.

SD15_UNET is runwayml/stable-diffusion-v1-5 unet/config.json (the same UNet as SD1.4), every field spelled out so a
change of diffusers defaults cannot change the benchmarked model. The other families' configs differ from it only
in the fields given (stabilityai/stable-diffusion-2-base, stable-diffusion-2-1 and stable-diffusion-xl-base-1.0
unet/config.json)."""

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


SD2_BASE_UNET = {**SD15_UNET, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
                 "use_linear_projection": True}
SD21_768_UNET = {**SD2_BASE_UNET, "sample_size": 96, "upcast_attention": True}
SDXL_UNET = {
    **SD15_UNET,
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# family -> (UNet config, native image side); the VAE downsamples by 8 in every family
FAMILY_UNETS = {
    "SD1.5": (SD15_UNET, 512),
    "SD2-base": (SD2_BASE_UNET, 512),
    "SD2.1-768": (SD21_768_UNET, 768),
    "SDXL": (SDXL_UNET, 1024),
}


def build_unet(config: dict, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> UNet2DConditionModel:
    """A UNet of ``config`` with seeded random weights on ``device``. On "meta" no memory is allocated: shapes and
    the module structure only, enough to count bytes and locate layers."""
    with torch.random.fork_rng(devices=[]), torch.device(device):  # the caller's CPU RNG is left untouched
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval()


def build_sd15_unet(
    device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, seed: int = 0
) -> UNet2DConditionModel:
    """The SD1.5 UNet (see ``build_unet``)."""
    return build_unet(SD15_UNET, device, dtype, seed)
