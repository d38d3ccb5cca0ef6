"""One batch: SampleSpecs -> images + SeeDiff masks + stats. Each sample's initial latents come from its own
torch.Generator seeded with spec.seed, so a sample's image does not depend on its batch neighbours."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from seediff.schemas.config import RunConfig
from seediff.schemas.records import SampleSpec
from seediff.workers import seediff
from seediff.workers.capture import CapturedAttention, SeeDiffCapture

NSFW_ERROR = "nsfw: blanked by the safety checker"


@dataclass
class GeneratedSample:
    spec: SampleSpec
    image: np.ndarray | None  # H x W x 3 uint8 RGB; None on failure
    mask: np.ndarray | None  # H x W bool foreground of spec.row's class (final mask, PAMR applied if on)
    mask_stats: dict = field(default_factory=dict)  # flat JSON-able numbers
    error: str | None = None


def generate_batch(
    pipe: StableDiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig
) -> list[GeneratedSample]:
    if not samples:
        return []
    size = config.resolution
    out, captured, positions = generate_with_capture(pipe, samples, config)
    # Quantise once, the way diffusers makes PIL images, so masks are refined on exactly the stored pixels.
    pixels = (out.images.float() * 255).round().clamp(0, 255)
    masks = seediff.seeded_masks(attention_maps(captured), (size, size), config.mask, images=pixels)
    images = pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    final = masks.mask.cpu().numpy()
    nsfw = out.nsfw_content_detected or [False] * len(samples)
    return [
        GeneratedSample(spec, None, None, {}, NSFW_ERROR)
        if nsfw[i]
        else GeneratedSample(spec, images[i], final[i], {**masks.stats[i], "class_tokens": len(positions[i])})
        for i, spec in enumerate(samples)
    ]


def generate_with_capture(
    pipe: StableDiffusionPipeline,
    samples: Sequence[SampleSpec],
    config: RunConfig,
    capture: SeeDiffCapture | None = None,
) -> tuple[Any, CapturedAttention, list[list[int]]]:
    """Run the pipeline on a batch with SeeDiff's attention capture installed: (pipeline output with images as
    tensors, the captured maps, each sample's class token positions). ``capture``: one kept installed on
    ``pipe.unet`` (a compiled UNet's, see ``compile_with_capture``); None installs one for this batch only."""
    positions = [class_token_positions(pipe.tokenizer, s.row.prompt, s.row.class_name, s) for s in samples]
    with ExitStack() as installed:
        if capture is None:
            capture = installed.enter_context(new_capture(pipe, config, len(samples)))
        capture.begin(positions, config.mask.capture_steps)
        out = pipe(**diffusion_inputs(pipe, samples, config), output_type="pt", callback_on_step_end=capture.step_end)
        return out, capture.result(), positions


def new_capture(pipe: StableDiffusionPipeline, config: RunConfig, max_samples: int) -> SeeDiffCapture:
    """Capture processors for ``pipe``'s UNet sized for batches of up to ``max_samples`` under ``config``."""
    return SeeDiffCapture(
        pipe.unet,
        config.resolution // pipe.vae_scale_factor,
        max_samples,
        guided=config.guidance_scale > 1,  # diffusers' do_classifier_free_guidance for SD UNets
        text_tokens=pipe.tokenizer.model_max_length,
        query_chunk=config.mask.query_chunk,
    )


def diffusion_inputs(pipe: StableDiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig) -> dict:
    """Keyword arguments of the pipeline call for a batch (all but output_type)."""
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    latents = initial_latents(generators, pipe.unet.config.in_channels, config.resolution // pipe.vae_scale_factor)
    return dict(
        prompt=[s.row.prompt for s in samples],
        negative_prompt=[s.row.negative_prompt for s in samples],
        height=config.resolution,
        width=config.resolution,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        generator=generators,  # per-sample noise for stochastic schedulers too
        latents=latents.to(pipe.unet.device, pipe.unet.dtype),
    )


def attention_maps(captured: CapturedAttention) -> seediff.AttentionMaps:
    return seediff.AttentionMaps(
        cross=captured.cross,
        self_coarse=captured.self_attn["coarse"],
        self_middle=captured.self_attn["middle"],
        self_fine=captured.self_attn["fine"],
    )


def initial_latents(generators: Sequence[torch.Generator], channels: int, latent_size: int) -> torch.Tensor:
    """Standard-normal fp32 latents on the CPU, one draw per sample generator: the same for any batch and device."""
    return torch.cat([torch.randn(1, channels, latent_size, latent_size, generator=g) for g in generators])


def class_token_positions(tokenizer, prompt: str, class_name: str, spec: SampleSpec | None = None) -> list[int]:
    """Positions, in the tokenized prompt the text encoder sees, of every sub-token of the first occurrence of the
    class phrase (case-insensitive)."""
    where = f"manifest line {spec.row.line} (sample {spec.sample_id})" if spec else "prompt"
    start = prompt.lower().find(class_name.lower())
    if start < 0:
        raise ValueError(f"{where}: prompt {prompt!r} does not contain class name {class_name!r}")
    end = start + len(class_name)
    encoded = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
    positions = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start]
    if not positions:
        raise ValueError(
            f"{where}: class name {class_name!r} falls beyond the tokenizer's {tokenizer.model_max_length} tokens"
        )
    return positions
