"""Load a diffusers Stable Diffusion pipeline of a supported family (workers/families.py picks the pipeline class:
SD 1.x/2.x or SDXL): a hub id or local path, or ``tiny`` (a miniature random-weight SD1.x with attention at latent,
latent/2 and latent/4, and an offline byte-level CLIP tokenizer) for tests and benches; ``build_tiny_model`` also
builds miniature SD2 and SDXL shapes."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from seediff.schemas.config import TINY_MODEL, RunConfig
from seediff.tokens import offline_clip_tokenizer
from seediff.workers import families
from seediff.workers.adapters import apply_adapters
from seediff.workers.families import TINY_UNET, TINY_VAE

# config.scheduler -> (class, settings over the model's own scheduler config). from_config keeps the model's
# prediction_type (v-prediction for SD 2.x 768), beta schedule and timestep spacing.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS, as SD ships it (50 steps = 51 UNet calls)
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {}),
    "dpm++_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

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


def load_model(config: RunConfig, device: torch.device) -> DiffusionPipeline:
    """The model with the pipeline class of its family (recognised from its config files when the config does not
    name the family yet) and the configured scheduler."""
    dtype = resolve_dtype(config.dtype, device)
    if config.model == TINY_MODEL:
        pipe = build_tiny_model()  # built in fp32; casting to the same dtype only makes diffusers warn
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        name = config.family or families.recognise(families.read_model_files(config.model, config.revision)).family.name
        pipeline_class = getattr(diffusers, families.family(name).pipeline)
        # Without network, straight to the local cache (what the driver's validation read too), not 5 retries a file.
        pipe = pipeline_class.from_pretrained(
            config.model, revision=config.revision, dtype=dtype, local_files_only=not families.hub_resolves(),
            **loading_options(config, pipeline_class),
        )
    apply_adapters(pipe, config)
    if config.scheduler != "default":
        scheduler_class, settings = SCHEDULERS[config.scheduler]
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **settings)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def loading_options(config: RunConfig, pipeline_class: type) -> dict[str, Any]:
    """``from_pretrained`` keywords of the run's loading settings: the weight files' ``variant``; with
    ``safety_checker`` off, no safety checker for a pipeline that has one (SD 1.x). On, it stays as the model ships
    it, and a flagged sample becomes a failure in generate.py."""
    options: dict[str, Any] = {}
    if config.variant:
        options["variant"] = config.variant
    if not config.safety_checker and "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        options.update(safety_checker=None, requires_safety_checker=False)
    return options


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
    scheduler_overrides: dict[str, Any] | None = None,
    xl: bool = False,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A deterministic random-weight SD pipeline (same weights on every call). Overrides change the UNet, text
    encoder, VAE or scheduler config, e.g. an SD2-style variant with other head counts, linear projections and
    v-prediction, or full-size SD1.5 shapes for benchmarks. ``xl``: an SDXL pipeline (a second text encoder with a
    projection, pooled embeddings and added time ids; the UNet's cross-attention width is both encoders' widths)."""
    text_cfg = {**TINY_TEXT, **(text_overrides or {})}
    width = text_cfg["hidden_size"]
    xl_unet = dict(
        cross_attention_dim=2 * width,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + width,  # six time ids x 8 + the pooled text embedding
    )
    unet_cfg = {**TINY_UNET, **(xl_unet if xl else {"cross_attention_dim": width}), **(unet_overrides or {})}
    tokenizer = offline_clip_tokenizer()
    text_config = CLIPTextConfig(
        **text_cfg,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(0)
        vae = AutoencoderKL(**{**TINY_VAE, **(vae_overrides or {})})
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config) if xl else None
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **(scheduler_overrides or {}),
    )
    common = dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                  scheduler=scheduler)
    if xl:
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=text_encoder_2.eval(), tokenizer_2=offline_clip_tokenizer(), add_watermarker=False
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )

