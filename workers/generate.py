"""One batch: SampleSpecs -> images + SeeDiff label maps + stats. Each sample's initial latents come from its own
torch.Generator seeded with spec.seed, so a sample's image does not depend on its batch neighbours."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from seediff.schemas.config import RunConfig
from seediff.schemas.records import PROMPT_STAGE, SAFETY_STAGE, SampleFailure, SampleSpec
from seediff.workers import seediff
from seediff.tokens import PhrasePositionError
from seediff.workers.capture import CapturedAttention, SeeDiffCapture, install_processors
from seediff.workers.families import choose_layers
from seediff.workers.joint_capture import new_joint_capture
from seediff.workers.models import backbone, compile_model, family_of, guided, pipeline_arguments, text_columns

NSFW_ERROR = f"{SAFETY_STAGE}: blanked by the safety checker (nsfw)"


@dataclass
class GeneratedSample:
    spec: SampleSpec
    image: np.ndarray | None  # H x W x 3 uint8 RGB; None on failure
    labels: np.ndarray | None  # H x W uint8 label map: 0 background, the sample's class ids, 255 ignore
    mask_stats: dict = field(default_factory=dict)  # label_maps' stats: flat numbers plus "classes"
    error: str | None = None


def generate_batch(
    pipe: DiffusionPipeline,
    samples: Sequence[SampleSpec],
    config: RunConfig,
    capture: SeeDiffCapture | None = None,
) -> list[GeneratedSample]:
    """A sample whose labelled phrase falls past the text encoder's context fails alone (``prompt: ...``); the dry
    run refuses such templates up front. Any other error is the batch's and propagates (the shard fails).
    ``capture``: see ``generate_with_capture``."""
    failures = {}
    for spec in samples:
        try:
            sample_token_positions(pipe, spec)
        except SampleFailure as e:
            failures[spec.sample_id] = str(e)
    runnable = [s for s in samples if s.sample_id not in failures]
    generated = {g.spec.sample_id: g for g in _generate(pipe, runnable, config, capture)} if runnable else {}
    return [generated.get(s.sample_id) or GeneratedSample(s, None, None, {}, failures[s.sample_id]) for s in samples]


def _generate(
    pipe: DiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig, capture: SeeDiffCapture | None
) -> list[GeneratedSample]:
    width, height = config.size
    out, captured, positions = generate_with_capture(pipe, samples, config, capture)
    # Quantise once, the way diffusers makes PIL images, so masks are refined on exactly the stored pixels.
    pixels = (out.images.float() * 255).round().clamp(0, 255)
    class_ids = [[c.class_id for c in s.classes] for s in samples]
    result = seediff.label_maps(attention_maps(captured, positions), class_ids, (height, width), config.mask, pixels)
    images = pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    labels = result.labels.cpu().numpy()
    # SDXL pipelines have no safety checker (their output has no nsfw field)
    nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(samples)
    generated = []
    for i, spec in enumerate(samples):
        if nsfw[i]:
            generated.append(GeneratedSample(spec, None, None, {}, NSFW_ERROR))
            continue
        stats = result.stats[i]
        for entry, tokens in zip(stats["classes"], positions[i]):
            entry["tokens"] = len(tokens)
        generated.append(GeneratedSample(spec, images[i], labels[i], stats))
    return generated


def generate_with_capture(
    pipe: DiffusionPipeline,
    samples: Sequence[SampleSpec],
    config: RunConfig,
    capture: SeeDiffCapture | None = None,
) -> tuple[Any, CapturedAttention, list[list[list[int]]]]:
    """Run the pipeline on a batch with SeeDiff's attention capture installed: (pipeline output with images as
    tensors, the captured maps, per sample the token positions of each of its classes). ``capture``: one kept
    installed on ``pipe.unet`` for good (an actor's, see ``install_capture``); None installs one for this batch
    only. The capture keeps each sample's class tokens concatenated; ``attention_maps`` splits them by class."""
    positions = [sample_token_positions(pipe, s) for s in samples]
    with ExitStack() as installed:
        if capture is None:
            capture = installed.enter_context(new_capture(pipe, config, len(samples)))
        capture.begin([sum(sample, []) for sample in positions], config.mask.capture_steps)
        out = pipe(**diffusion_inputs(pipe, samples, config), output_type="pt", callback_on_step_end=capture.step_end)
        return out, capture.result(), positions


def new_capture(pipe: DiffusionPipeline, config: RunConfig, max_samples: int) -> SeeDiffCapture:
    """Capture processors for ``pipe``'s UNet sized for batches of up to ``max_samples`` under ``config``: the layers
    of ``config.layers``, the family's cascade where it leaves it unset (derived from the UNet's config). The UNet
    sees [unconditional, conditional] batches when the generation uses guidance (diffusers'
    do_classifier_free_guidance); annotate runs condition every row. An MM-DiT gets its joint-attention capture."""
    if family_of(pipe).backbone == "transformer":
        return new_joint_capture(pipe, config, max_samples)
    return SeeDiffCapture(
        pipe.unet,
        latent_grid(pipe, config),
        max_samples,
        guided=config.annotate is None and guided(pipe, config.guidance_scale),
        text_tokens=pipe.tokenizer.model_max_length,
        query_chunk=config.mask.query_chunk,
        layers=choose_layers(dict(pipe.unet.config), config.layers),
        max_self_entries=config.mask.max_self_entries,
    )


def install_capture(
    pipe: DiffusionPipeline,
    config: RunConfig,
    warm_up: Callable[[DiffusionPipeline, RunConfig, SeeDiffCapture], None] | None = None,
) -> tuple[SeeDiffCapture, float | None]:
    """The actor's capture: one for batches of ``config.batch_size``, installed on ``pipe``'s UNet for good (building
    and installing one per batch walks the UNet twice: ~4 % of a tiny-model batch). With ``config.compile`` also
    compile the UNet and the VAE decoder (``compile_model``; compiled code is specialised to these processors) and
    pay the compile cost now with ``warm_up``, one call shaped like the run's batches (default ``warm_up_generation``;
    annotate runs pass theirs). Returns the capture and the compile seconds (None without compile). A shard's smaller
    last batch compiles once more, on first use."""
    capture = new_capture(pipe, config, config.batch_size)
    install_processors(backbone(pipe), capture.processors())
    if not config.compile:
        return capture, None
    for tensor in capture.tensors():  # updated in place between calls: CUDA graphs must replay on these very tensors
        torch._dynamo.mark_static_address(tensor)
    compile_model(pipe, config.compile_mode)
    started = time.perf_counter()
    (warm_up or warm_up_generation)(pipe, config, capture)
    return capture, time.perf_counter() - started


def warm_up_generation(pipe: DiffusionPipeline, config: RunConfig, capture: SeeDiffCapture) -> None:
    """A one-step generation of ``config.batch_size`` blank prompts through ``capture``."""
    capture.begin([[1]] * config.batch_size)
    width, height = config.size
    pipe(
        prompt=[""] * config.batch_size,
        height=height,
        width=width,
        num_inference_steps=1,
        guidance_scale=config.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
        callback_on_step_end=capture.step_end,
    )


def sample_token_positions(pipe: DiffusionPipeline, spec: SampleSpec) -> list[list[int]]:
    """Token positions (the backbone's text-key columns) of each class of the sample, from where its phrases were
    placed in the rendered prompt (``models.text_columns``: SDXL's and SD3's CLIP tokenizers must agree). Both a
    phrase past the context and disagreeing tokenizers are the sample's own failures (``SampleFailure`` of the
    prompt stage)."""
    where = f"manifest line {spec.row.line} (sample {spec.sample_id})" if spec.row.line else f"sample {spec.sample_id}"
    try:
        return text_columns(pipe, spec.prompt)
    except PhrasePositionError as e:
        raise SampleFailure(PROMPT_STAGE, f"{where}: {e}") from e
    except ValueError as e:  # the tokenizers disagree
        raise SampleFailure(PROMPT_STAGE, f"{where}: {e}") from e


def latent_grid(pipe: DiffusionPipeline, config: RunConfig) -> tuple[int, int]:
    """(height, width) of the latent."""
    width, height = config.size
    return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def diffusion_inputs(pipe: DiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig) -> dict:
    """Keyword arguments of the pipeline call for a batch (all but output_type): per-sample generators (initial
    latents, and noise for stochastic schedulers), the family's own arguments (``models.pipeline_arguments``)."""
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    return pipeline_arguments(pipe, [s.prompt.text for s in samples],
                              [config.negative_prompt_of(s.row.negative_prompt) for s in samples],
                              generators, config.size, config.steps, config.guidance_scale)


def attention_maps(captured: CapturedAttention, positions: Sequence[Sequence[Sequence[int]]]) -> seediff.AttentionMaps:
    """The captured maps with each sample's cross maps split by class. The capture keeps the token columns of all
    its classes layer-major ([layer, token] rows); a class keeps its own tokens, still layer-major."""
    cross = []
    for maps, per_class in zip(captured.cross, positions):
        tokens = sum(len(p) for p in per_class)
        by_layer = maps.view(-1, tokens, *maps.shape[-2:])
        bounds = np.cumsum([0] + [len(p) for p in per_class])
        cross.append([by_layer[:, a:b].reshape(-1, *maps.shape[-2:]) for a, b in zip(bounds[:-1], bounds[1:])])
    return seediff.AttentionMaps(cross=cross, self_attn=captured.self_attn)
