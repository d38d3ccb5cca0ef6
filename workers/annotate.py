"""Annotation's images and captured attention (``ANNOTATION``, a ``workers/batch.BatchImages``): real images read
by the model, with the attention captured exactly as in generation.

Per image: decode, resize to the run's size (a size every SeeDiff side is exact for), VAE-encode (the latent
distribution's mean), add noise at each configured timestep with the sample's own generator, run the UNet once per
timestep with the prompt naming the image's classes under the same capture as generation; the label step
(``workers/batch.label_batch``) labels the resized image and resizes the labels back to the image's own size. No
classifier-free guidance: every captured row is conditional."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from seediff.schemas.config import RunConfig
from seediff.schemas.records import CROSS_FIELD, IMAGE_FIELDS, IMAGE_STAGE, InputSample, SampleFailure, image_field
from seediff.workers import seediff
from seediff.workers.batch import (
    CapturedBatch, attention_maps, batch_capture, latent_grid, per_sample, sample_token_positions,
)
from seediff.workers.capture import SeeDiffCapture
from seediff.workers.encode import InputImage
from seediff.workers.models import backbone_call, noise_latents, text_conditioning


def decode_rgb(fields: dict[str, Any]) -> np.ndarray:
    """The sample's image as H x W x 3 uint8, pixels as stored (no EXIF rotation: the mask must match the pixels
    every reader decodes). An image that is missing, truncated or undecodable is the sample's failure (``image``
    stage), named by its input URL and key."""
    key = fields.get("__key__")
    where = fields.get("__url__", "?") + ("" if key is None else f": sample {key}")
    name = image_field(fields)
    if name is None:
        raise SampleFailure(IMAGE_STAGE, f"{where}: no image field (one of {', '.join(IMAGE_FIELDS)}) among "
                            f"{sorted(k for k in fields if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(fields[name])) as im:
            return np.array(im.convert("RGB"))
    except UnidentifiedImageError:  # its message names the BytesIO's address: not deterministic
        raise SampleFailure(IMAGE_STAGE, f"{where}: {name}: not an image Pillow can decode") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL: OSError subclasses for truncated data
        raise SampleFailure(IMAGE_STAGE, f"{where}: {name}: {e}") from e


class Annotation:
    """The input's own images, VAE-encoded and noised to each timestep, one backbone call per timestep."""

    def guided(self, pipe: DiffusionPipeline, config: RunConfig) -> bool:
        return False  # every captured row is conditional: annotate runs no classifier-free guidance

    def run(
        self, pipe: DiffusionPipeline, samples: Sequence[InputSample], config: RunConfig, capture: SeeDiffCapture | None
    ) -> CapturedBatch:
        """A sample whose input cannot be read or decoded, or whose prompt cannot place its classes, fails alone;
        its neighbours go on. With ``annotate.cross_attention_labels``, each sample run also gets ``cross.png``."""
        ready, failures = per_sample(lambda sample: _readable(pipe, sample), samples)  # (positions, decoded image)
        images = [InputImage(sample) for sample in samples]
        ran = list(ready)
        if not ran:
            return CapturedBatch(images, failures, ran)
        for i in ran:
            rgb = ready[i][1]
            images[i] = InputImage(samples[i], (rgb.shape[1], rgb.shape[0]))
        positions = [ready[i][0] for i in ran]
        specs = [samples[i].spec for i in ran]
        width, height = config.size
        pixels = torch.stack([
            torch.from_numpy(np.array(Image.fromarray(ready[i][1]).resize((width, height), Image.Resampling.BICUBIC)))
            for i in ran
        ]).permute(0, 3, 1, 2).float()  # [B, 3, H, W] in 0..255: what the VAE encodes and PAMR refines on
        with torch.no_grad(), batch_capture(pipe, config, self, capture, len(ran)) as capture:
            latents = encode_latents(pipe, pixels)
            noise = torch.cat([
                torch.randn(1, *latents.shape[1:], generator=torch.Generator("cpu").manual_seed(spec.seed))
                for spec in specs
            ]).to(latents.device, latents.dtype)
            conditioning = text_conditioning(pipe, [spec.prompt.text for spec in specs], (height, width),
                                             config.guidance_scale)
            capture.begin([sum(p, []) for p in positions], config.mask.capture_steps)
            for t in config.annotate.timesteps:
                step = torch.full((len(specs),), t, dtype=torch.long, device=latents.device)
                backbone_call(pipe, noise_latents(pipe, latents, noise, step), step, conditioning)
                capture.advance()
            captured = capture.result()
        extra: list[dict[str, np.ndarray]] = [{} for _ in ran]
        if config.annotate.cross_attention_labels:
            class_ids = [[c.class_id for c in spec.classes] for spec in specs]
            cross = _cross_labels(attention_maps(captured, positions), class_ids, (height, width), config)
            extra = [{CROSS_FIELD: labels} for labels in cross]
        return CapturedBatch(images, failures, ran, pixels.to(latents.device), captured, positions, extra)

    def warm_up(self, pipe: DiffusionPipeline, config: RunConfig, capture: SeeDiffCapture) -> None:
        """One backbone call shaped like an annotate batch of ``config.batch_size`` (blank prompts, zero latents in
        the VAE's dtype, the first timestep) through ``capture``."""
        width, height = config.size
        batch = config.batch_size
        with torch.no_grad():
            conditioning = text_conditioning(pipe, [""] * batch, (height, width), config.guidance_scale)
            latents = torch.zeros(batch, pipe.vae.config.latent_channels, *latent_grid(pipe, config),
                                  dtype=pipe.vae.dtype, device=pipe.vae.device)
            step = torch.full((batch,), config.annotate.timesteps[0], dtype=torch.long, device=latents.device)
            capture.begin([[1]] * batch)
            backbone_call(pipe, latents, step, conditioning)
            capture.advance()


ANNOTATION = Annotation()


def _readable(pipe: DiffusionPipeline, sample: InputSample) -> tuple[list[list[int]], np.ndarray]:
    """The sample's class token positions and its decoded image: an input that could not be read, a prompt that
    cannot place its classes, an image that does not decode are its own failures, in this order."""
    if sample.error is not None:
        raise SampleFailure(IMAGE_STAGE, sample.error)
    return sample_token_positions(pipe, sample.spec), decode_rgb(sample.fields)


def encode_latents(pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (the posterior mean, shifted and scaled as the backbone expects) of images in 0..255, in the
    VAE's dtype. A VAE whose config sets ``force_upcast`` (SDXL's: it overflows in float16) encodes in float32, as
    diffusers' img2img pipelines do."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype != torch.float32 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        x = (pixels / 127.5 - 1.0).to(vae.device, vae.dtype)
        mean = vae.encode(x).latent_dist.mean
    finally:
        if upcast:
            vae.to(dtype=dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0
    return ((mean - shift) * vae.config.scaling_factor).to(dtype)


def _cross_labels(maps: seediff.AttentionMaps, class_ids: list[list[int]], size: tuple[int, int],
                  config: RunConfig) -> np.ndarray:
    """Plain cross-attention labels: each class's coarse seed map (the variance-gated, min-max normalised sum of its
    cross maps) upsampled bicubically; a pixel takes the strongest class whose map exceeds the threshold."""
    labels = []
    for per_class, ids in zip(maps.cross, class_ids):
        coarse, _ = seediff.coarse_seed_map(list(per_class))  # [K, s, s]: one "sample" per class
        scores = seediff.bicubic(coarse, size)  # [K, H, W]
        best, winner = scores.max(0)
        chosen = torch.tensor(ids, device=winner.device)[winner]
        labels.append(torch.where(best > config.annotate.cross_attention_threshold, chosen, 0).to(torch.uint8))
    return torch.stack(labels).cpu().numpy()
