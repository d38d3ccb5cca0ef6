"""One annotate batch: real images -> SeeDiff label maps, with the attention captured exactly as in generation.

Per image: decode, resize to the run's size (a size every SeeDiff side is exact for), VAE-encode (the latent
distribution's mean), add noise at each configured timestep with the sample's own generator, run the UNet once per
timestep with the prompt naming the image's classes under the same capture as generation, then ``label_maps`` on
the resized image and a nearest-neighbour resize of the labels back to the image's own size. No classifier-free
guidance: every captured row is conditional."""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from seediff.schemas.config import RunConfig
from seediff.schemas.records import IMAGE_STAGE, InputSample, SampleFailure, SampleSpec
from seediff.workers import seediff
from seediff.workers.capture import SeeDiffCapture
from seediff.workers.encode import INPUT_IMAGE_FIELDS
from seediff.workers.generate import attention_maps, latent_grid, new_capture, sample_token_positions
from seediff.workers.models import backbone_call, noise_latents, text_conditioning


@dataclass
class AnnotatedSample:
    sample: InputSample
    labels: np.ndarray | None  # H x W uint8 at the image's own size: 0 background, class ids, 255 ignore
    cross_labels: np.ndarray | None  # the same from plain thresholded cross-attention, when configured
    mask_stats: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def spec(self) -> SampleSpec:
        return self.sample.spec


def decode_rgb(fields: dict[str, Any]) -> np.ndarray:
    """The sample's image as H x W x 3 uint8, pixels as stored (no EXIF rotation: the mask must match the pixels
    every reader decodes). An image that is missing, truncated or undecodable is the sample's failure (``image``
    stage), named by its input URL and key."""
    key = fields.get("__key__")
    where = fields.get("__url__", "?") + ("" if key is None else f": sample {key}")
    name = next((name for name in INPUT_IMAGE_FIELDS if name in fields), None)
    if name is None:
        raise SampleFailure(IMAGE_STAGE, f"{where}: no image field (one of {', '.join(INPUT_IMAGE_FIELDS)}) among "
                            f"{sorted(k for k in fields if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(fields[name])) as im:
            return np.array(im.convert("RGB"))
    except UnidentifiedImageError:  # its message names the BytesIO's address: not deterministic
        raise SampleFailure(IMAGE_STAGE, f"{where}: {name}: not an image Pillow can decode") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL: OSError subclasses for truncated data
        raise SampleFailure(IMAGE_STAGE, f"{where}: {name}: {e}") from e


def annotate_batch(
    pipe: DiffusionPipeline, samples: Sequence[InputSample], config: RunConfig, capture: SeeDiffCapture | None = None
) -> list[AnnotatedSample]:
    """Label maps for a batch; a sample whose input cannot be read or decoded, or whose prompt cannot place its
    classes, becomes a failed sample, its neighbours go on. ``capture``: one kept installed on ``pipe.unet`` (an
    actor's, ``install_capture``); None installs one for this batch only."""
    decoded: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for sample in samples:
        try:
            if sample.error is not None:
                raise SampleFailure(IMAGE_STAGE, sample.error)
            sample_token_positions(pipe, sample.spec)
            decoded.append(decode_rgb(sample.fields))
            errors.append(None)
        except SampleFailure as e:
            decoded.append(None)
            errors.append(str(e))
    ok = [i for i, rgb in enumerate(decoded) if rgb is not None]
    results = [AnnotatedSample(s, None, None, {}, errors[i]) for i, s in enumerate(samples)]
    if ok:
        labelled = _label([samples[i] for i in ok], [decoded[i] for i in ok], pipe, config, capture)
        for i, result in zip(ok, labelled):
            results[i] = result
    return results


def _label(
    samples: list[InputSample],
    images: list[np.ndarray],
    pipe: DiffusionPipeline,
    config: RunConfig,
    capture: SeeDiffCapture | None,
) -> list[AnnotatedSample]:
    width, height = config.size
    pixels = torch.stack([
        torch.from_numpy(np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)))
        for rgb in images
    ]).permute(0, 3, 1, 2).float()  # [B, 3, H, W] in 0..255: what the VAE encodes and PAMR refines on
    specs = [s.spec for s in samples]
    positions = [sample_token_positions(pipe, spec) for spec in specs]
    with torch.no_grad(), ExitStack() as installed:
        if capture is None:
            capture = installed.enter_context(new_capture(pipe, config, len(specs)))
        latents = _encode(pipe, pixels)
        noise = torch.cat([
            torch.randn(1, *latents.shape[1:], generator=torch.Generator("cpu").manual_seed(spec.seed)) for spec in specs
        ]).to(latents.device, latents.dtype)
        conditioning = text_conditioning(pipe, [spec.prompt.text for spec in specs], (height, width),
                                         config.guidance_scale)
        capture.begin([sum(p, []) for p in positions], config.mask.capture_steps)
        for t in config.annotate.timesteps:
            step = torch.full((len(specs),), t, dtype=torch.long, device=latents.device)
            backbone_call(pipe, noise_latents(pipe, latents, noise, step), step, conditioning)
            capture.advance()
        captured = capture.result()
    maps = attention_maps(captured, positions)
    class_ids = [[c.class_id for c in spec.classes] for spec in specs]
    result = seediff.label_maps(maps, class_ids, (height, width), config.mask, pixels.to(latents.device))
    labels = result.labels.cpu().numpy()
    cross = _cross_labels(maps, class_ids, (height, width), config) if config.annotate.cross_attention_labels else None
    annotated = []
    for i, (sample, rgb) in enumerate(zip(samples, images)):
        original = (rgb.shape[1], rgb.shape[0])
        stats = result.stats[i]
        for entry, tokens in zip(stats["classes"], positions[i]):
            entry["tokens"] = len(tokens)
        annotated.append(AnnotatedSample(
            sample, _resize_labels(labels[i], original), None if cross is None else _resize_labels(cross[i], original),
            stats,
        ))
    return annotated


def warm_up_annotation(pipe: DiffusionPipeline, config: RunConfig, capture: SeeDiffCapture) -> None:
    """One UNet call shaped like an annotate batch of ``config.batch_size`` (blank prompts, zero latents in the VAE's
    dtype, the first timestep) through ``capture``: what a compiled UNet compiles for (``install_capture``)."""
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


def _encode(pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (the posterior mean, shifted and scaled as the backbone expects) of images in 0..255."""
    vae = pipe.vae
    x = (pixels / 127.5 - 1.0).to(vae.device, vae.dtype)
    return (vae.encode(x).latent_dist.mean - (getattr(vae.config, "shift_factor", None) or 0)) * vae.config.scaling_factor


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


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map at (width, height) by nearest neighbour: every value stays a label."""
    if (labels.shape[1], labels.shape[0]) == size:
        return labels
    return np.array(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
