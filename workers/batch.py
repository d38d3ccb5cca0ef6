"""One batch, of either kind, into labelled samples. A kind (``BatchImages``: ``GENERATION`` in workers/generate.py,
``ANNOTATION`` in workers/annotate.py; the actor chooses one from the plan's kind) gives the batch's images and
their captured attention (``CapturedBatch``); the one label step (``label_batch``) turns them into label maps the
same way for both. Also the capture a batch runs under (``new_capture``, ``install_capture``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from seediff.schemas.config import RunConfig
from seediff.schemas.records import PROMPT_STAGE, InputSample, SampleFailure, SampleSpec
from seediff.tokens import PhrasePositionError
from seediff.workers import seediff
from seediff.workers.capture import CapturedAttention, SeeDiffCapture, install_processors
from seediff.workers.encode import LabelledSample, SampleImage
from seediff.workers.families import choose_layers
from seediff.workers.joint_capture import new_joint_capture
from seediff.workers.models import backbone, compile_model, family_of, text_columns

T = TypeVar("T")


@dataclass(frozen=True)
class CapturedBatch:
    """A batch's images and captured attention, from its kind. ``images``: every sample of the batch, in order, as
    its kind stores it; ``failures``: batch index -> ``stage: message`` of the samples that failed in a per-sample
    stage of the kind (prompt, image, safety); ``ran``: the batch indices of the samples the model ran on, in the
    order of the rows below (a sample may have run and failed after: the safety checker)."""

    images: list[SampleImage]
    failures: dict[int, str]
    ran: list[int]
    pixels: torch.Tensor | None = None  # [len(ran), 3, H, W] in 0..255 at the run's size: what labels are refined on
    captured: CapturedAttention | None = None
    positions: list[list[list[int]]] | None = None  # per sample run: each class's token positions
    extra_labels: list[dict[str, np.ndarray]] | None = None  # per sample run: further label maps at the run's size


class BatchImages(Protocol):
    """How a batch gets its images and captured attention: ``run(pipe, samples, config, capture)`` ->
    ``CapturedBatch`` (its per-sample stages' failures as failures; anything raised is the shard's); ``guided(pipe,
    config)``: whether its captured batches are [unconditional, conditional] rows; ``warm_up(pipe, config,
    capture)``: one call shaped like its batches, what a compiled backbone compiles for."""

    def run(
        self, pipe: DiffusionPipeline, samples: Sequence[Any], config: RunConfig, capture: SeeDiffCapture | None
    ) -> CapturedBatch: ...

    def guided(self, pipe: DiffusionPipeline, config: RunConfig) -> bool: ...

    def warm_up(self, pipe: DiffusionPipeline, config: RunConfig, capture: SeeDiffCapture) -> None: ...


def label_batch(
    pipe: DiffusionPipeline,
    samples: Sequence[SampleSpec] | Sequence[InputSample],
    config: RunConfig,
    images: BatchImages,
    capture: SeeDiffCapture | None = None,
) -> list[LabelledSample]:
    """The batch's labelled samples, in order: ``images`` runs it, the samples it ran get their label maps at the
    run's size, resized to their images' own (nearest neighbour), with their kind's further label maps. ``capture``:
    one kept installed on the backbone (an actor's, ``install_capture``); None installs one for this batch only."""
    batch = images.run(pipe, samples, config, capture)
    labelled_samples = [LabelledSample(image, error=batch.failures.get(i)) for i, image in enumerate(batch.images)]
    if not batch.ran:
        return labelled_samples
    specs = [batch.images[i].spec for i in batch.ran]
    result = _label_maps(batch.captured, batch.positions, specs, config, batch.pixels)
    labels = result.labels.cpu().numpy()
    for row, i in enumerate(batch.ran):
        if i in batch.failures:
            continue
        size = batch.images[i].size
        extra = {name: _resize_labels(maps, size) for name, maps in batch.extra_labels[row].items()}
        labelled_samples[i] = LabelledSample(batch.images[i], _resize_labels(labels[row], size), extra, result.stats[row])
    return labelled_samples


def _label_maps(
    captured: CapturedAttention, positions: Sequence[Sequence[Sequence[int]]], specs: Sequence[Any], config: RunConfig,
    pixels: torch.Tensor,
) -> seediff.LabelMaps:
    """A batch's captured attention -> SeeDiff label maps at the run's size (refined on ``pixels``, [B, 3, H, W] in
    0..255), each class's stats with its token count."""
    width, height = config.size
    maps = attention_maps(captured, positions)
    class_ids = [[c.class_id for c in spec.classes] for spec in specs]
    result = seediff.label_maps(maps, class_ids, (height, width), config.mask, pixels)
    for stats, per_class in zip(result.stats, positions):
        for entry, tokens in zip(stats["classes"], per_class):
            entry["tokens"] = len(tokens)
    return result


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


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map at (width, height) by nearest neighbour: every value stays a label."""
    if (labels.shape[1], labels.shape[0]) == size:
        return labels
    return np.array(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))


def per_sample(stage: Callable[[Any], T], samples: Sequence[Any]) -> tuple[dict[int, T], dict[int, str]]:
    """A kind's per-sample stages before its model runs, on each sample of a batch: (batch index -> what ``stage``
    returned, batch index -> ``stage: message`` of each sample it failed with a ``SampleFailure``)."""
    done: dict[int, T] = {}
    failures: dict[int, str] = {}
    for i, sample in enumerate(samples):
        try:
            done[i] = stage(sample)
        except SampleFailure as e:
            failures[i] = str(e)
    return done, failures


def sample_token_positions(pipe: DiffusionPipeline, spec: Any) -> list[list[int]]:
    """Token positions (the backbone's text-key columns) of each class of the sample, from where its phrases were
    placed in the rendered prompt (``models.text_columns``: SDXL's and SD3's CLIP tokenizers must agree). Both a
    phrase past the context and disagreeing tokenizers are the sample's own failures (``SampleFailure`` of the
    prompt stage)."""
    where = spec.where
    try:
        return text_columns(pipe, spec.prompt)
    except PhrasePositionError as e:
        raise SampleFailure(PROMPT_STAGE, f"{where}: {e}") from e
    except ValueError as e:  # the tokenizers disagree
        raise SampleFailure(PROMPT_STAGE, f"{where}: {e}") from e


@contextmanager
def batch_capture(
    pipe: DiffusionPipeline, config: RunConfig, images: BatchImages, capture: SeeDiffCapture | None, samples: int
) -> Iterator[SeeDiffCapture]:
    """``capture`` when given (installed for good), else one for ``samples`` samples, installed for the block."""
    if capture is not None:
        yield capture
        return
    with new_capture(pipe, config, samples, images.guided(pipe, config)) as fresh:
        yield fresh


def new_capture(pipe: DiffusionPipeline, config: RunConfig, max_samples: int, guided: bool) -> SeeDiffCapture:
    """Capture processors for ``pipe``'s UNet sized for batches of up to ``max_samples`` under ``config``: the layers
    of ``config.layers``, the family's cascade where it leaves it unset (derived from the UNet's config). ``guided``:
    the backbone sees [unconditional, conditional] batches (``BatchImages.guided``). An MM-DiT gets its
    joint-attention capture."""
    if family_of(pipe).backbone == "transformer":
        return new_joint_capture(pipe, config, max_samples, guided)
    return SeeDiffCapture(
        pipe.unet,
        latent_grid(pipe, config),
        max_samples,
        guided=guided,
        text_tokens=pipe.tokenizer.model_max_length,
        query_chunk=config.mask.query_chunk,
        layers=choose_layers(dict(pipe.unet.config), config.layers),
        max_self_entries=config.mask.max_self_entries,
    )


def install_capture(
    pipe: DiffusionPipeline, config: RunConfig, images: BatchImages
) -> tuple[SeeDiffCapture, float | None]:
    """The actor's capture: one for ``images``' batches of ``config.batch_size``, installed on ``pipe``'s backbone
    for good (building and installing one per batch walks the UNet twice: ~4 % of a tiny-model batch). With
    ``config.compile`` also compile the backbone and the VAE decoder (``compile_model``; compiled code is specialised
    to these processors) and pay the compile cost now with ``images.warm_up``, one call shaped like the run's
    batches. Returns the capture and the compile seconds (None without compile). A shard's smaller last batch
    compiles once more, on first use."""
    capture = new_capture(pipe, config, config.batch_size, images.guided(pipe, config))
    install_processors(backbone(pipe), capture.processors())
    if not config.compile:
        return capture, None
    for tensor in capture.tensors():  # updated in place between calls: CUDA graphs must replay on these very tensors
        torch._dynamo.mark_static_address(tensor)
    compile_model(pipe, config.compile_mode)
    started = time.perf_counter()
    images.warm_up(pipe, config, capture)
    return capture, time.perf_counter() - started


def latent_grid(pipe: DiffusionPipeline, config: RunConfig) -> tuple[int, int]:
    """(height, width) of the latent."""
    width, height = config.size
    return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
