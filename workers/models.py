"""Load a diffusers pipeline of a supported family (workers/families.py picks the pipeline class: SD 1.x/2.x, SDXL,
Flux.1 or SD3): a hub id or local path, or ``tiny`` (a miniature random-weight SD1.x with attention at latent,
latent/2 and latent/4, and an offline byte-level CLIP tokenizer) for tests and benches; ``build_tiny_model`` also
builds miniature SD2 and SDXL shapes, ``build_tiny_mmdit`` Flux- and SD3-shaped ones (offline T5 tokenizer too).
What differs between families at call time (the backbone, the latents' layout, which prompt arguments the pipeline
takes) is answered here, from the family table, so the generation code calls one function."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LCMScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from seediff.schemas.config import TINY_MODEL, RunConfig
from seediff.schemas.prompts import RenderedPrompt
from seediff.tokens import PhrasePositionError, class_token_positions, offline_clip_tokenizer
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
    # Few-step checkpoints: LCM(-LoRA) takes LCM's own sampler; SDXL-Turbo/Lightning take timesteps counted from the
    # last training step ("trailing"), so a 1-step run starts from pure noise.
    "lcm": (LCMScheduler, {}),
    "ddim_trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "euler_trailing": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_a_trailing": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
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


def compile_model(pipe: DiffusionPipeline, mode: str) -> None:
    """torch.compile the backbone (UNet or transformer) and the VAE decoder in place (the modules keep their
    identity, so the pipeline and its attention processors still reach them): whole graphs (a graph break is an
    error, not a silent slow path) and static shapes (batch size and resolution are fixed by the run config).
    ``mode``: torch.compile's; "default", "reduce-overhead" (CUDA graphs) or "max-autotune". Compilation itself
    happens on the first call."""
    options = dict(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    backbone(pipe).compile(**options)
    pipe.vae.decoder.compile(**options)


# ---- what differs between families at call time ----------------------------------------------------------------------


def family_of(pipe: DiffusionPipeline) -> families.Family:
    """The family row of a loaded pipeline (by its class; SD 1.x and 2.x run the same way)."""
    name = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl"}
    return families.family(name.get(type(pipe).__name__, "sd1"))


def backbone(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The denoising network whose attention SeeDiff reads: the UNet, or an MM-DiT's transformer."""
    return pipe.transformer if family_of(pipe).backbone == "transformer" else pipe.unet


def guided(pipe: DiffusionPipeline, guidance_scale: float) -> bool:
    """Whether a generation at ``guidance_scale`` runs classifier-free guidance ([unconditional, conditional]
    batches): never for guidance-distilled families (Flux.1: every row conditional), else above 1 (0 and 1: off)."""
    return family_of(pipe).cfg and guidance_scale > 1


def noise_latents(pipe: DiffusionPipeline, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """A real image's latents noised to integer training ``timesteps`` [B] the family's own way (the family table's
    ``noising``): "ddpm", sqrt(a_t) x + sqrt(1 - a_t) e on the model's beta schedule; "flow" (flow matching: Flux,
    SD3), x_t = (1 - s) x + s e with s = t / 1000, the time the transformer is given."""
    if family_of(pipe).noising == "flow":
        sigma = (timesteps.to(torch.float32) / 1000).view(-1, *[1] * (latents.dim() - 1))
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
    return DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)


def text_conditioning(pipe: DiffusionPipeline, prompts: list[str], size: tuple[int, int],
                      guidance_scale: float) -> dict[str, Any]:
    """The backbone's inputs other than latents and time for conditional calls outside the pipeline (annotate), as
    the family's pipeline builds them: the text states (SDXL: plus pooled embedding and size/crop ids (image size
    (height, width), no crop); Flux: pooled CLIP, T5 ids and, for guidance-distilled dev, the guidance value; SD3:
    the pooled CLIP-L|G)."""
    name, device = family_of(pipe).name, backbone(pipe).device
    if name == "flux":
        embeddings, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                          max_sequence_length=families.FLUX_T5_TOKENS)
        guidance = (torch.full((len(prompts),), guidance_scale, device=device)
                    if pipe.transformer.config.guidance_embeds else None)
        return dict(encoder_hidden_states=embeddings, pooled_projections=pooled, txt_ids=text_ids, guidance=guidance)
    if name == "sd3":
        embeddings, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=families.SD3_T5_TOKENS)
        return dict(encoder_hidden_states=embeddings, pooled_projections=pooled)
    encoded = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    if name != "sdxl":
        return dict(encoder_hidden_states=encoded[0])
    embeddings, pooled = encoded[0], encoded[2]
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=embeddings.dtype, device=embeddings.device)
    return dict(encoder_hidden_states=embeddings,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)})


def backbone_call(pipe: DiffusionPipeline, latents: torch.Tensor, timesteps: torch.Tensor,
                  conditioning: dict[str, Any]) -> None:
    """One backbone call on latents [B, C, h, w] at integer training ``timesteps`` [B] with ``text_conditioning``'s
    inputs, in the family's layout (Flux: packed 2x2 patches with their position ids, time / 1000)."""
    if family_of(pipe).name == "flux":
        batch, channels, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, latents.device, latents.dtype)
        pipe.transformer(hidden_states=packed, timestep=timesteps.to(latents.dtype) / 1000, img_ids=ids,
                         **conditioning)
    elif family_of(pipe).name == "sd3":
        pipe.transformer(hidden_states=latents, timestep=timesteps, **conditioning)
    else:
        pipe.unet(latents, timesteps, **conditioning)


def text_columns(pipe: DiffusionPipeline, prompt: RenderedPrompt) -> list[list[int]]:
    """Per class of ``prompt``: its columns in the backbone's text keys, from where its phrases were placed (token
    offsets). A family's text keys are segments in sequence order (SD: 77 CLIP positions; SDXL: both CLIP
    tokenizers' 77; Flux: the T5 positions; SD3: 77 CLIP-L|CLIP-G positions, then T5's); the tokenizers of one
    segment must place every phrase at the same positions (their encoders' states are concatenated feature-wise),
    so one that disagrees is a ValueError, never a silently shifted map. ``PhrasePositionError``: a phrase past a
    segment's context."""
    columns: list[list[int]] = [[] for _ in prompt.spans]
    offset = 0
    for segment in family_of(pipe).text:
        found = [class_token_positions(getattr(pipe, name), prompt) for name in segment.tokenizers]
        if any(p != found[0] for p in found[1:]):
            raise ValueError(f"the model's tokenizers place the class phrases at different token positions {found}; "
                             "SeeDiff cannot read its cross-attention")
        for (name, _), positions in zip(prompt.spans, found[0]):
            if positions[-1] >= segment.length - 1:  # the encoder keeps segment.length positions, EOS the last
                raise PhrasePositionError(
                    f"labelled phrase of class {name!r} ends at token {positions[-1] + 1}, past the {segment.length} "
                    f"tokens the pipeline keeps of {segment.tokenizers[0]} (EOS included): shorten the text before it"
                )
        columns = [c + [offset + p for p in positions] for c, positions in zip(columns, found[0])]
        offset += segment.length
    return columns


def pipeline_arguments(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negative_prompts: list[str],
    generators: list[torch.Generator],
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
) -> dict[str, Any]:
    """Keyword arguments of the pipeline call for a batch (all but output_type and the callback): each sample's
    initial latents from its own generator (standard normal, fp32, on the CPU: the same for any batch or device),
    in the layout the family's pipeline takes; Flux gets no negative prompt (it would switch on true CFG)."""
    found = family_of(pipe)
    width, height = size
    net = backbone(pipe)
    channels = net.config.in_channels // (4 if found.name == "flux" else 1)  # Flux packs 2x2 latent patches
    grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.cat([torch.randn(1, channels, *grid, generator=g) for g in generators])
    if found.name == "flux":
        latents = FluxPipeline._pack_latents(latents, len(prompts), channels, *grid)
    arguments = dict(
        prompt=prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
        generator=generators, latents=latents.to(net.device, net.dtype), **dict(found.call_arguments),
    )
    if found.cfg:
        arguments["negative_prompt"] = negative_prompts
    return arguments


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



# ---- miniature MM-DiTs -----------------------------------------------------------------------------------------------

# Flux.1 and SD3 in miniature: the real ones' block kinds, RoPE / positional embedding, qk-norms and text encoders at
# a width of 32; a VAE of factor 8 with 16 latent channels and the real ones' scaling and shift.
TINY_MMDIT_VAE = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
TINY_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)
TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=32, qk_norm="rms_norm",
)


def build_tiny_mmdit(family_name: str) -> FluxPipeline | StableDiffusion3Pipeline:
    """A deterministic random-weight Flux.1-schnell-shaped (``flux``: double- and single-stream blocks, RoPE, CLIP
    pooled + T5, no guidance embedding) or SD3.5-shaped (``sd3``: joint blocks with RMS qk-norms, CLIP-L + CLIP-G +
    T5) pipeline with offline tokenizers."""
    clip = offline_clip_tokenizer()
    t5 = offline_t5_tokenizer()
    clip_config = CLIPTextConfig(**TINY_TEXT, bos_token_id=clip.bos_token_id, eos_token_id=clip.eos_token_id,
                                 pad_token_id=clip.pad_token_id, projection_dim=TINY_TEXT["hidden_size"])
    flux = family_name == "flux"
    t5_config = T5Config(**{**TINY_T5, "d_model": 32 if flux else 64}, vocab_size=len(t5), pad_token_id=0,
                         eos_token_id=1, decoder_start_token_id=0)
    vae_shift = (0.1159, 0.3611) if flux else (0.0609, 1.5305)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**TINY_FLUX) if flux else SD3Transformer2DModel(**TINY_SD3)
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_MMDIT_VAE, shift_factor=vae_shift[0], scaling_factor=vae_shift[1])
        torch.manual_seed(0)
        text_encoder = (CLIPTextModel if flux else CLIPTextModelWithProjection)(clip_config)
        torch.manual_seed(1)
        text_encoder_t5 = T5EncoderModel(t5_config)
        torch.manual_seed(2)
        text_encoder_2 = None if flux else CLIPTextModelWithProjection(clip_config)
    common = dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip)
    if flux:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # schnell's
        return FluxPipeline(**common, scheduler=scheduler, text_encoder_2=text_encoder_t5.eval(), tokenizer_2=t5)
    return StableDiffusion3Pipeline(
        **common, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=offline_clip_tokenizer(), text_encoder_3=text_encoder_t5.eval(), tokenizer_3=t5,
    )


def offline_t5_tokenizer() -> Any:
    """A character-level T5 (SentencePiece-style unigram, "▁" word marks, EOS appended) fast tokenizer built in
    memory: no network needed; offsets map tokens to prompt characters as the real one's do."""
    import string

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tokenizer_models
    from transformers import T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in chars]
    tokenizer = Tokenizer(tokenizer_models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           model_max_length=512, extra_ids=0)
