"""Model families: which diffusers pipeline runs a checkpoint, which image sizes its backbone (a UNet, or an MM-DiT
transformer) takes exactly, and which attention layers SeeDiff reads, recognised from the checkpoint's
``model_index.json``, ``unet/config.json`` or ``transformer/config.json`` and ``vae/config.json`` (kilobytes: a local
folder, or only those files from the hub) before any weights load.

Plain data and json only (no torch, no diffusers), so the driver's validation and dry run use it before Ray starts.
A family is one row of ``FAMILIES``; what differs between checkpoints of one family (sides, head counts, how many
transformer layers or blocks) is read from the backbone's config, never hard-coded."""

from __future__ import annotations

import functools
import json
import math
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from seediff.schemas.config import TINY_MODEL, ConfigError, LayerChoice, RunConfig

# The offline miniature SD1.x (workers/models.py builds it): three cross-attention levels (latent, latent/2,
# latent/4) and a plain bottom level. Its configs are recognised like any checkpoint's.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads in SD1.x-style UNets
)
# Downsampling factor 8 like SD's VAE (three downsamplers), so width / 8 = latent width.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
_TINY_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}

COARSE_DEPTH = 2  # SeeDiff seeds at latent/4 (16x16 for SD1.x at 512 px), as the official code
_DEFAULT_VAE_FACTOR = 8  # Stable Diffusion's VAE, when a checkpoint ships no vae/config.json


@dataclass(frozen=True)
class TextSegment:
    """One stretch of the text keys the backbone's attention sees, in sequence order: the token positions of
    ``tokenizers`` (which must place every class phrase at the same positions: their encoders' states are
    concatenated feature-wise), ``length`` positions long (the tokenizer's context, or the pipeline's
    ``max_sequence_length``)."""

    tokenizers: tuple[str, ...]  # pipeline attributes
    length: int


CLIP = 77  # CLIP's context, every family's CLIP encoders


@dataclass(frozen=True)
class Family:
    """One row of the family table."""

    name: str  # recorded in run.json and each sample's metadata
    pipeline: str  # the diffusers pipeline class that runs it
    components: tuple[str, ...]  # model_index.json entries it cannot run without
    description: str
    backbone: str = "unet"  # "unet", or "transformer" (an MM-DiT: joint attention over [text, image] tokens)
    text: tuple[TextSegment, ...] = (TextSegment(("tokenizer",), CLIP),)  # the text keys of its attention
    cfg: bool = True  # guidance_scale > 1 runs classifier-free guidance ([unconditional, conditional] batches)
    call_arguments: tuple[tuple[str, Any], ...] = ()  # fixed extra arguments of the pipeline call
    noising: str = "ddpm"  # how annotate noises a real latent: "ddpm" (sqrt(a) x + sqrt(1 - a) e) or "flow"

    @property
    def text_tokens(self) -> int:
        return sum(s.length for s in self.text)


_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
FLUX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length default (T5 padding unmasked: the class columns only)
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's
FAMILIES = (
    Family("sd1", "StableDiffusionPipeline", _SD_COMPONENTS, "Stable Diffusion 1.x"),
    Family("sd2", "StableDiffusionPipeline", _SD_COMPONENTS,
           "Stable Diffusion 2.x (512 base or 768 v-prediction; linear attention projections)"),
    Family("sdxl", "StableDiffusionXLPipeline", (*_SD_COMPONENTS, "text_encoder_2", "tokenizer_2"),
           "Stable Diffusion XL base (two text encoders, pooled embeddings, added time ids)",
           text=(TextSegment(("tokenizer", "tokenizer_2"), CLIP),)),
    # Flux.1 is guidance-distilled: guidance_scale feeds its guidance embedding (schnell has none), every row is
    # conditional; CLIP gives only the pooled vector, so T5 is the whole joint text sequence.
    Family("flux", "FluxPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
           "Flux.1 (dev, schnell): MM-DiT, double- then single-stream blocks, CLIP-L pooled + T5",
           backbone="transformer", text=(TextSegment(("tokenizer_2",), FLUX_T5_TOKENS),), cfg=False,
           call_arguments=(("max_sequence_length", FLUX_T5_TOKENS),), noising="flow"),
    # SD3's joint text sequence is the 77 CLIP-L|CLIP-G positions, then the T5 positions.
    Family("sd3", "StableDiffusion3Pipeline",
           ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
            "tokenizer_3"),
           "Stable Diffusion 3 / 3.5: MM-DiT joint blocks, CLIP-L + CLIP-G + T5",
           backbone="transformer",
           text=(TextSegment(("tokenizer", "tokenizer_2"), CLIP), TextSegment(("tokenizer_3",), SD3_T5_TOKENS)),
           call_arguments=(("max_sequence_length", SD3_T5_TOKENS),), noising="flow"),
)
_BY_NAME = {f.name: f for f in FAMILIES}
# Pipelines with a transformer that have no family row yet, and why, so the refusal names them.
_NOT_YET = {
    "Flux2Pipeline": "Flux.2",
    "QwenImagePipeline": "Qwen-Image",
    "HiDreamImagePipeline": "HiDream-I1",
    "SanaPipeline": "SANA (linear self-attention: no softmax map to read)",
    "SanaSprintPipeline": "SANA-Sprint (linear self-attention: no softmax map to read)",
    "PixArtAlphaPipeline": "PixArt-alpha (not joint attention)",
    "PixArtSigmaPipeline": "PixArt-Sigma (not joint attention)",
    "FluxFillPipeline": "Flux.1 Fill (inpainting)",
    "FluxInpaintPipeline": "Flux.1 inpainting",
    "FluxImg2ImgPipeline": "Flux.1 image-to-image",
    "FluxControlPipeline": "Flux.1 Control (image-conditioned)",
    "FluxControlNetPipeline": "Flux.1 with a ControlNet",
    "FluxKontextPipeline": "Flux.1 Kontext (image editing)",
    "StableDiffusion3InpaintPipeline": "SD3 inpainting",
    "StableDiffusion3Img2ImgPipeline": "SD3 image-to-image",
    "StableDiffusion3ControlNetPipeline": "SD3 with a ControlNet",
    "StableDiffusionInpaintPipeline": "SD inpainting",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusionControlNetPipeline": "SD with a ControlNet",
    "StableDiffusionXLControlNetPipeline": "SDXL with a ControlNet",
}
# A transformer's latent channels: Flux packs 16 VAE channels in 2x2 patches; anything else is a Fill/Control
# variant that takes an image or mask in the extra channels.
_TRANSFORMERS = {"flux": ("FluxTransformer2DModel", 64), "sd3": ("SD3Transformer2DModel", 16)}


@dataclass(frozen=True)
class ModelFiles:
    """The small config files of a checkpoint."""

    source: str  # where they were read, for messages
    index: dict[str, Any]  # model_index.json
    unet: dict[str, Any] | None  # unet/config.json; None when the pipeline has no UNet
    vae: dict[str, Any] | None  # vae/config.json
    scheduler: dict[str, Any] | None  # scheduler/scheduler_config.json
    transformer: dict[str, Any] | None = None  # transformer/config.json (MM-DiTs)


@dataclass(frozen=True)
class Recognised:
    """A checkpoint recognised as a family, with what the run needs from its configs."""

    family: Family
    files: ModelFiles
    layers: LayerChoice  # the family's default layer choice for this UNet
    unit: int  # valid widths and heights are multiples of this many pixels
    vae_factor: int
    native_size: int  # the UNet's sample size in pixels
    prediction_type: str | None
    unit_reason: str = ""  # what the unit is made of, for messages

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(latent height, latent width)."""
        return height // self.vae_factor, width // self.vae_factor


def family(name: str) -> Family:
    return _BY_NAME[name]


# ---- reading the config files ---------------------------------------------------------------------------------------


def read_model_files(model: str, revision: str | None = None) -> ModelFiles:
    """The checkpoint's config files, from a local folder or the hub (only these files are downloaded)."""
    if model == TINY_MODEL:
        return ModelFiles("the tiny model", _TINY_INDEX, dict(TINY_UNET), dict(TINY_VAE), {})
    local = Path(model).expanduser()
    if local.exists():
        if local.is_file():
            raise ConfigError(
                f"model: {model} is a single file; seediff loads diffusers folders (model_index.json + components): "
                "convert it with the pipeline's from_single_file(...).save_pretrained(folder)"
            )
        return ModelFiles(str(local), _read_json(local / "model_index.json", required=True),
                          *(_read_json(local / name) for name in _CONFIG_FILES))
    return ModelFiles(f"{model} (hub)", _hub_json(model, revision, "model_index.json", required=True),
                      *(_hub_json(model, revision, name) for name in _CONFIG_FILES))


_CONFIG_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "transformer/config.json")


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ConfigError(f"model: {path} not found: not a diffusers pipeline folder")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model: {path}: not valid JSON: {e}") from e


def _hub_json(repo: str, revision: str | None, name: str, required: bool = False) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return _read_json(Path(hf_hub_download(repo, name, revision=revision, local_files_only=not hub_resolves())),
                          required)
    except LocalEntryNotFoundError as e:  # offline (HF_HUB_OFFLINE or no network) and not in the local cache
        from huggingface_hub import constants

        why = e if hub_resolves() else f"{urlsplit(constants.ENDPOINT).hostname} does not resolve"
        raise ConfigError(f"model: cannot read {name} of {repo!r} from the hub: not cached and offline ({why})") from e
    except EntryNotFoundError:
        if required:
            raise ConfigError(f"model: {repo} has no {name} on the hub: not a diffusers pipeline") from None
        return None
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: each means the run cannot start
        raise ConfigError(f"model: cannot read {name} of {repo!r} from the hub: {type(e).__name__}: {e}") from e


@functools.cache
def hub_resolves() -> bool:
    """Whether the hub's host name resolves. On a machine without network it does not, and the files come from the
    local cache alone: huggingface_hub would retry each file five times with backoff (24 s) to say the same."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlsplit(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


# ---- recognition -----------------------------------------------------------------------------------------------------


def recognise(files: ModelFiles) -> Recognised:
    """The family of a checkpoint, or ConfigError naming the pipeline class and what is missing."""
    index, unet = files.index, files.unet
    pipeline = index.get("_class_name", "<no _class_name>")
    supported = sorted({f.pipeline for f in FAMILIES})
    candidates = [f for f in FAMILIES if f.pipeline == pipeline]
    if pipeline in _NOT_YET:
        raise ConfigError(
            f"model: {files.source}: pipeline {pipeline} ({_NOT_YET[pipeline]}) is not supported yet: SeeDiff has no "
            f"family row for it; supported pipelines: {', '.join(supported)}"
        )
    if candidates and candidates[0].backbone == "transformer":
        return _recognise_transformer(files, candidates[0])
    if not candidates:
        has = "a transformer (DiT/MMDiT), no UNet" if "transformer" in index and "unet" not in index else None
        raise ConfigError(
            f"model: {files.source}: pipeline {pipeline} is not supported"
            f"{f' ({has})' if has else ''}; supported pipelines: {', '.join(supported)}"
        )
    missing = [c for c in candidates[0].components if not _present(index, c)]
    if missing or unet is None:
        raise ConfigError(
            f"model: {files.source}: {pipeline} is missing {', '.join(missing or ['unet/config.json'])}"
            + (" (an SDXL refiner has no first text encoder)" if "text_encoder" in missing else "")
        )
    if unet.get("in_channels", 4) != 4 or unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConfigError(
            f"model: {files.source}: {pipeline} with a {unet.get('_class_name', 'UNet')} of {unet.get('in_channels')} "
            "input channels (an inpainting or image-conditioned UNet); SeeDiff generates from noise: 4 latent channels"
        )
    xl = unet.get("addition_embed_type") == "text_time"
    if pipeline == "StableDiffusionXLPipeline" and not xl:
        raise ConfigError(f"model: {files.source}: {pipeline} whose UNet has no added time embedding (text_time)")
    name = "sdxl" if xl else ("sd2" if unet.get("use_linear_projection") else "sd1")
    found = family(name)
    if found.pipeline != pipeline:
        raise ConfigError(f"model: {files.source}: {pipeline} with an {name} UNet; expected {found.pipeline}")
    vae_factor = 2 ** (len(files.vae["block_out_channels"]) - 1) if files.vae else _DEFAULT_VAE_FACTOR
    layers = default_layers(unet)
    check_layers(unet, layers, files.source)
    return Recognised(
        family=found,
        files=files,
        layers=layers,
        unit=vae_factor * 2 ** _downsamplings(unet),
        vae_factor=vae_factor,
        native_size=unet.get("sample_size", 64) * vae_factor,
        prediction_type=(files.scheduler or {}).get("prediction_type"),
        unit_reason=f"VAE factor {vae_factor} x 2^{_downsamplings(unet)} UNet downsamplings",
    )


def _recognise_transformer(files: ModelFiles, found: Family) -> Recognised:
    """An MM-DiT family's checkpoint: its transformer's class and latent channels checked, its block counts read."""
    pipeline, transformer = found.pipeline, files.transformer
    missing = [c for c in found.components if not _present(files.index, c)]
    if missing or transformer is None:
        raise ConfigError(f"model: {files.source}: {pipeline} is missing {', '.join(missing or ['transformer/config.json'])}")
    cls, channels = _TRANSFORMERS[found.name]
    if transformer.get("_class_name", cls) != cls or transformer.get("in_channels", channels) != channels:
        raise ConfigError(
            f"model: {files.source}: {pipeline} with a {transformer.get('_class_name')} of "
            f"{transformer.get('in_channels')} input channels (a Fill, Control or other image-conditioned variant); "
            f"SeeDiff generates from noise: a {cls} of {channels}"
        )
    vae_factor = 2 ** (len(files.vae["block_out_channels"]) - 1) if files.vae else _DEFAULT_VAE_FACTOR
    layers = default_joint_layers(found.name, transformer)
    check_joint_layers(found.name, transformer, layers, files.source)
    unit, reason = joint_unit(vae_factor, patch_size(found.name, transformer), layers)
    return Recognised(
        family=found,
        files=files,
        layers=layers,
        unit=unit,
        vae_factor=vae_factor,
        native_size=transformer.get("sample_size", 128) * vae_factor,  # Flux ships none: FluxPipeline's 128
        prediction_type=None,
        unit_reason=reason,
    )


def patch_size(family_name: str, transformer: dict[str, Any]) -> int:
    """Latent cells per image token along a side: FluxPipeline packs 2x2 latent patches, SD3 patchifies by its
    config's patch_size."""
    return 2 if family_name == "flux" else transformer.get("patch_size", 2)


def joint_unit(vae_factor: int, patch: int, layers: LayerChoice) -> tuple[int, str]:
    """The size unit that makes the token grid and every pooled cascade side exact, and what it is made of."""
    depth = max(layers.cascade)
    return vae_factor * patch * 2**depth, f"VAE factor {vae_factor} x patch {patch} x 2^{depth} cascade poolings"


def joint_blocks(family_name: str, transformer: dict[str, Any]) -> tuple[int, int]:
    """(joint blocks with their own text stream, single-stream blocks): Flux's double- and single-stream blocks;
    SD3's joint blocks and none."""
    if family_name == "flux":
        return transformer.get("num_layers", 19), transformer.get("num_single_layers", 38)
    return transformer.get("num_layers", 24), 0


def default_joint_layers(family_name: str, transformer: dict[str, Any]) -> LayerChoice:
    """The family's blocks scaled to this transformer's depth. Flux: seeds from the last 4 double-stream blocks
    (ConceptAttention), expansion by double-stream block 12 of 19 (GoCA's); SD3: seeds from blocks 8-11 of 24 around
    Seg4Diff's block 9, expansion by block 9. Cascade: seeds and expansion at grid/4, background refinement at grid/2,
    no full-grid side (one token's row there is too noisy and local for the refinement's cosines: bench/RESULTS.md,
    "MM-DiT defaults", measured on synthetic joint-attention scenes at Flux's 64x64 grid)."""
    double, _ = joint_blocks(family_name, transformer)
    if family_name == "flux":
        cross, expand = tuple(range(max(0, double - 4), double)), round(12 * double / 19)
    else:
        first, last = round(8 * double / 24), round(11 * double / 24)
        cross, expand = tuple(range(first, max(first, last) + 1)), round(9 * double / 24)
    return LayerChoice(cascade=(2, 1), cross_blocks=cross, self_block=min(expand, double - 1))


def choose_joint_layers(family_name: str, transformer: dict[str, Any], override: LayerChoice) -> LayerChoice:
    """``override`` (a config's ``layers``) with the family's defaults where it leaves a field unset."""
    default = default_joint_layers(family_name, transformer)
    unset = {k: getattr(default, k) for k in ("cascade", "cross_blocks", "self_block") if getattr(override, k) is None}
    return override.model_copy(update=unset)


def check_joint_layers(family_name: str, transformer: dict[str, Any], layers: LayerChoice, source: str) -> None:
    """ConfigError naming a block the transformer does not have."""
    total = sum(joint_blocks(family_name, transformer))
    wrong = [b for b in (*layers.cross_blocks, layers.self_block) if not 0 <= b < total]
    if wrong or not layers.cross_blocks:
        raise ConfigError(
            f"layers: blocks {wrong or 'none'} {'are not' if wrong else 'given:'} in the transformer of {source}: "
            f"it has blocks 0-{total - 1} (forward order) and cross_blocks needs at least one"
        )


def _present(index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and entry[0] is not None


def _downsamplings(unet: dict[str, Any]) -> int:
    """diffusers' UNet2DConditionModel downsamples after every down block but the last."""
    return len(unet["down_block_types"]) - 1


def attention_depths(unet: dict[str, Any], group: str) -> set[int]:
    """Depths below the latent at which the ``group`` ("down", "mid", "up") blocks carry attention."""
    if group == "mid":
        mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return {_downsamplings(unet)} if mid and "CrossAttn" in mid else set()
    types = unet[f"{group}_block_types"]
    depth_of = (lambda i: i) if group == "down" else (lambda i: len(types) - 1 - i)
    return {depth_of(i) for i, t in enumerate(types) if "CrossAttn" in t}


def default_layers(unet: dict[str, Any]) -> LayerChoice:
    """SeeDiff's recipe on this UNet: seeds from every down/up cross-attention layer at latent/4, expansion by the
    first decoder self-attention there, then background-seeded refinement at each finer side that has decoder
    self-attention (SD 1.x/2.x: latent/4 -> latent/2 -> latent; SDXL: latent/4 -> latent/2)."""
    decoder = attention_depths(unet, "up")
    cascade = [COARSE_DEPTH]
    while cascade[-1] - 1 in decoder:
        cascade.append(cascade[-1] - 1)
    return LayerChoice(cascade=tuple(cascade))


def choose_layers(unet: dict[str, Any], override: LayerChoice) -> LayerChoice:
    """``override`` (a config's ``layers``) with the family's cascade where it leaves the cascade unset."""
    if override.cascade is not None:
        return override
    return override.model_copy(update={"cascade": default_layers(unet).cascade})


def check_layers(unet: dict[str, Any], layers: LayerChoice, source: str) -> None:
    """ConfigError naming what the layer choice needs and this UNet lacks (counted from its config)."""
    coarse = layers.cascade[0]
    missing = []
    if not any(coarse in attention_depths(unet, g) for g in layers.seed_blocks):
        missing.append(f"cross-attention in {'/'.join(layers.seed_blocks)} blocks at depth {coarse}")
    decoder = attention_depths(unet, "up")
    missing += [f"decoder self-attention at depth {d}" for d in layers.cascade if d not in decoder]
    if missing:
        raise ConfigError(
            f"model: {source}: its UNet lacks attention SeeDiff reads: {'; '.join(missing)} (depth 0 = latent, "
            f"1 = latent/2, ...); decoder attention at depths {sorted(decoder)}"
        )


# ---- sizes -------------------------------------------------------------------------------------------------------


def check_size(config: RunConfig, recognised: Recognised) -> tuple[int, int]:
    """(width, height): given, or the model's native size; ConfigError naming the field and the nearest valid sizes
    when one is not a multiple of the unit that makes every UNet side (and so every SeeDiff side) exact."""
    unit = recognised.unit
    width = config.width or config.resolution or recognised.native_size
    height = config.height or config.resolution or recognised.native_size
    for name, value, given in (("width", width, config.width), ("height", height, config.height)):
        if value % unit:
            field = name if given else "resolution"
            lower, upper = max(unit, value // unit * unit), math.ceil(value / unit) * unit
            raise ConfigError(
                f"{field}: {value} px is not a multiple of {unit} px, the size unit of this {recognised.family.name} "
                f"model ({recognised.unit_reason}); nearest valid: {lower} or {upper}"
            )
    return width, height


def resolve(config: RunConfig) -> tuple[RunConfig, Recognised]:
    """Recognise the model and return the config with family, size and layer choice filled in (what run.json
    records), checked against the model: ConfigError (exit 2 on the command line) before any weights load."""
    recognised = recognise(read_model_files(config.model, config.revision))
    if config.family is not None and config.family != recognised.family.name:
        raise ConfigError(
            f"family: the config says {config.family}, but {config.model} is {recognised.family.name} "
            f"({recognised.family.description})"
        )
    if recognised.family.backbone == "transformer":
        name, transformer = recognised.family.name, recognised.files.transformer
        layers = choose_joint_layers(name, transformer, config.layers)
        check_joint_layers(name, transformer, layers, recognised.files.source)
        if config.scheduler != "default":
            raise ConfigError(f"scheduler: {config.scheduler} is a UNet scheduler; {name} models run their own "
                              "flow-matching scheduler (default)")
        unit, reason = joint_unit(recognised.vae_factor, patch_size(name, transformer), layers)
        recognised = replace(recognised, layers=layers, unit=unit, unit_reason=reason)
    else:
        if config.layers.cross_blocks is not None or config.layers.self_block is not None:
            raise ConfigError(f"layers: cross_blocks and self_block name MM-DiT blocks; {recognised.family.name} "
                              "is a UNet family (cascade, seed_blocks, expand_layer)")
        layers = choose_layers(recognised.files.unet, config.layers)
        check_layers(recognised.files.unet, layers, recognised.files.source)
    width, height = check_size(config, recognised)
    resolved = config.model_copy(
        update={"family": recognised.family.name, "layers": layers, "width": width, "height": height}
    )
    return resolved, recognised
