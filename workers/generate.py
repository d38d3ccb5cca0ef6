"""Generation's images and captured attention (``GENERATION``, a ``workers/batch.BatchImages``): SampleSpecs ->
the pipeline's images under the capture. Each sample's initial latents come from its own torch.Generator seeded with
spec.seed, so a sample's image does not depend on its batch neighbours."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline

from seediff.schemas.config import RunConfig
from seediff.schemas.records import SAFETY_STAGE, SampleSpec
from seediff.workers.batch import CapturedBatch, batch_capture, per_sample, sample_token_positions
from seediff.workers.capture import SeeDiffCapture
from seediff.workers.encode import GeneratedImage
from seediff.workers.models import guided, pipeline_arguments

NSFW_ERROR = f"{SAFETY_STAGE}: blanked by the safety checker (nsfw)"


class Generation:
    """The model samples each image from its prompt, under classifier-free guidance where the family and the
    guidance scale run it (diffusers' do_classifier_free_guidance)."""

    def guided(self, pipe: DiffusionPipeline, config: RunConfig) -> bool:
        return guided(pipe, config.guidance_scale)

    def run(
        self, pipe: DiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig, capture: SeeDiffCapture | None
    ) -> CapturedBatch:
        """A sample whose labelled phrase falls past the text encoder's context fails alone (``prompt: ...``; the
        dry run refuses such templates up front), so does one the safety checker blanks (``safety: ...``)."""
        positions, failures = per_sample(lambda spec: sample_token_positions(pipe, spec), samples)
        images = [GeneratedImage(spec) for spec in samples]
        ran = list(positions)
        if not ran:
            return CapturedBatch(images, failures, ran)
        specs = [samples[i] for i in ran]
        with batch_capture(pipe, config, self, capture, len(ran)) as capture:
            capture.begin([sum(positions[i], []) for i in ran], config.mask.capture_steps)
            out = pipe(**diffusion_inputs(pipe, specs, config), output_type="pt", callback_on_step_end=capture.step_end)
            captured = capture.result()
        # Quantise once, the way diffusers makes PIL images, so masks are refined on exactly the stored pixels.
        pixels = (out.images.float() * 255).round().clamp(0, 255)
        rgb = pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # SDXL pipelines have no safety checker (their output has no nsfw field)
        nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(ran)
        for row, i in enumerate(ran):
            if nsfw[row]:
                failures[i] = NSFW_ERROR
            else:
                images[i] = GeneratedImage(samples[i], rgb[row])
        return CapturedBatch(images, failures, ran, pixels, captured, [positions[i] for i in ran], [{}] * len(ran))

    def warm_up(self, pipe: DiffusionPipeline, config: RunConfig, capture: SeeDiffCapture) -> None:
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


GENERATION = Generation()


def diffusion_inputs(pipe: DiffusionPipeline, samples: Sequence[SampleSpec], config: RunConfig) -> dict:
    """Keyword arguments of the pipeline call for a batch (all but output_type): per-sample generators (initial
    latents, and noise for stochastic schedulers), the family's own arguments (``models.pipeline_arguments``)."""
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    return pipeline_arguments(pipe, [s.prompt.text for s in samples],
                              [config.negative_prompt_of(s.row.negative_prompt) for s in samples],
                              generators, config.size, config.steps, config.guidance_scale)
