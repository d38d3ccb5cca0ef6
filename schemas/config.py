"""Run configuration: everything that changes output bytes (``RunConfig``) versus how the run is executed
(``RuntimeOptions``). ``RunConfig`` is written to ``run.json`` at the output root; a resumed run whose output-changing
fields differ is refused (``RunConfig.differences``)."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seediff.schemas.prompts import class_template


DEFAULT_PROMPT_TEMPLATE = "a photograph of a {class_name}"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The offline miniature random-weight SD (workers/models.py builds it); named here so that validating a config and
# dry runs need no model code.
TINY_MODEL = "tiny"
# A field that the run records but nobody sets (its ``json_schema_extra["flag"]``): it gets no command-line flag.
RECORDED = ""
# The layout of the output (file names, tar fields, parquet columns, sample metadata). Bumped only when that changes,
# so upgrading seediff does not refuse to resume an output; 1 = before the per-field sha256 columns.
OUTPUT_FORMAT = 2


class InputError(ValueError):
    """Bad input to a run (manifest, settings, output root), found before any model loads or Ray starts; the
    message names the file and line, the field or the flag. The command line exits 2 on it."""


class RetryLater(InputError):
    """The run cannot start (or go on) now, but the same command may succeed later: the output's lease is held by
    another driver, the storage endpoint does not answer. The command line exits 3 on it, so a retrying wrapper
    tells it from bad input."""


class ConfigError(InputError):
    """A config file or flag value that cannot be used; the message names the source and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_mapping(cls, data: Any, source: str, written_as: dict[str, str] | None = None) -> Any:
        """Validate plain data (a parsed file merged with flags); ``ConfigError`` names each field as the user wrote
        it: ``written_as`` maps a dotted field name to its flag or ``file:line: key``, other fields get ``source``."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(validation_message(e, source, written_as)) from e


class MaskConfig(_Strict):
    """SeeDiff mask settings (defaults: the official demo's recipe with fewer PAMR iterations)."""

    threshold: float = Field(
        0.5, gt=0, lt=1, description="threshold on the full-resolution soft map when refine is 'none'"
    )
    refine: Literal["pamr", "none"] = Field("pamr", description="boundary refinement: PAMR on the image, or none")
    pamr_input_threshold: float = Field(0.3, gt=0, lt=1, description="soft-map level that seeds PAMR")
    pamr_iterations: int = Field(500, ge=1, le=100_000, description="PAMR iterations")
    pamr_output_threshold: float = Field(0.8, gt=0, lt=1, description="PAMR output level kept as the object")
    ignore_band: float = Field(
        0.3,  # bench/bench_scenes.py
        ge=0,
        lt=1,
        description="label 255 (ignore) where the best class score lies within this width below the threshold "
        "(threshold, or pamr_output_threshold with PAMR); background only below threshold - band; 0 = no band",
    )
    ignore_margin: float = Field(
        0.0,  # bench/bench_scenes.py: no gain on its scenes at any margin
        ge=0,
        lt=1,
        description="label 255 (ignore) where a second class also scores above the threshold within this margin of "
        "the best class; 0 = the best class always wins",
    )
    capture_steps: tuple[int, int] | None = Field(
        None,
        description="UNet calls averaged into the attention maps, as [start, stop) call indices; "
        "unset: every call (the official recipe)",
    )
    query_chunk: int = Field(
        1024, ge=16, description="query rows per chunk of captured self-attention; bounds the transient memory"
    )
    max_self_entries: int = Field(
        4096**2,
        ge=1,
        description="cap on the entries (queries x keys) of one captured self-attention sum per image (SD1.5's "
        "64x64 side: 4096^2, 67 MB in fp32); a larger side sums its keys in f x f blocks, the smallest f that fits",
    )

    @field_validator("capture_steps")
    @classmethod
    def _window(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError("capture_steps must be [start, stop) with 0 <= start < stop")
        return v


class AnnotateConfig(_Strict):
    """Labelling real images (``seediff annotate``): how the image is shown to the model."""

    classes_field: str | None = Field(
        None, description="key of each input sample's json holding its list of class names; with --classes (then a "
        "class table), the sample's own field of that name (e.g. cls; else its json key) holding integer indexes into "
        "the table, 0 = its first name, several separated by spaces or commas; unset: every image gets the --classes "
        "list", json_schema_extra={"flag": "--classes-field"}
    )
    caption_field: str | None = Field(
        None, description="the input sample's own field (e.g. txt; else its json key) holding a caption with marked "
        "class phrases, \"a {dog} on a {sofa:couch}\" (the generate prompt syntax): the rendered caption is the "
        "prompt, its marked phrases are the image's classes; instead of --classes-field",
        json_schema_extra={"flag": "--caption-field"},
    )
    timesteps: tuple[int, ...] = Field(
        (100,), min_length=1, description="noise levels (of the scheduler's training steps, 0 = clean) at which the "
        "UNet reads the encoded image, one UNet call each; the maps are averaged over the calls. 100 is what "
        "DiffSegmenter and GoCA use on real images"
    )
    cross_attention_labels: bool = Field(
        False, json_schema_extra={"flag": "--cross-attention-labels"}, description="also write cross.png: the plain cross-attention label map (each class's coarse cross "
        "map above cross_attention_threshold, the strongest class wins), the baseline eval compares against"
    )
    cross_attention_threshold: float = Field(
        0.5, gt=0, lt=1, json_schema_extra={"flag": "--cross-attention-threshold"},
        description="threshold of the min-max normalised coarse cross-attention map for cross.png",
    )

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 <= t < 1000 for t in v) or len(set(v)) != len(v):
            raise ValueError("timesteps must be distinct integers in [0, 1000)")
        return v


class LayerChoice(_Strict):
    """Which UNet attention layers SeeDiff reads. Sides are named by downsampling depth below the latent: 0 is the
    latent, 1 latent/2, 2 latent/4. Each model family has a default (workers/families.py); a config may override
    any of these fields, the rest come from the family."""

    cascade: tuple[int, ...] | None = Field(
        None,
        description="depths of the self-attention sides, coarse first, each one level finer than the last "
        "(SD 1.x/2.x: [2, 1, 0]; SDXL: [2, 1]); seeds come from cross-attention at the first; unset: the family's",
    )
    seed_blocks: tuple[Literal["down", "mid", "up"], ...] = Field(
        ("down", "up"), min_length=1, description="UNet block groups whose cross-attention layers at the coarse side "
        "give the seeds (every such layer is read)"
    )
    expand_layer: int = Field(
        0, ge=0, description="which decoder self-attention layer at each side expands the seeds (0 = the first in "
        "forward order)"
    )
    # MM-DiTs (flux, sd3) have one image-token grid: their cascade depths count 2x2 poolings below it, and these two
    # name transformer blocks in forward order (Flux: double-stream blocks first, then single-stream ones).
    cross_blocks: tuple[int, ...] | None = Field(
        None, description="MM-DiT only: transformer blocks whose image->text joint attention gives the seeds "
        "(averaged); unset: the family's"
    )
    self_block: int | None = Field(
        None, ge=0, description="MM-DiT only: the transformer block whose image->image joint attention, pooled to "
        "each cascade side, expands and refines the seeds; unset: the family's"
    )

    @field_validator("cascade")
    @classmethod
    def _cascade(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or v[-1] < 0 or any(b != a - 1 for a, b in zip(v, v[1:]))):
            raise ValueError("cascade must be depths >= 0, coarse first, each one less than the last (e.g. [2, 1, 0])")
        return v


class LoraAdapter(_Strict):
    """A LoRA adapter applied to the model (diffusers' adapter API, peft backend): a diffusers, kohya or peft LoRA
    safetensors file, by local path or hub id; written on the command line as ``PATH[:WEIGHT]``."""

    path: str = Field(description="local .safetensors file (or a folder holding one), or a hub id: owner/repo, "
                      "owner/repo/file.safetensors")
    weight: float = Field(1.0, ge=-10, le=10, description="scale of the adapter's update; 0 = the model unchanged")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the adapter file, recorded when the run is "
        "validated (if set, the file must have it)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """``PATH[:WEIGHT]``: the text after the last colon is the weight when it is a number (so s3:// and
        C:\\ paths stay whole)."""
        if not isinstance(value, str):
            return value
        path, colon, weight = value.rpartition(":")
        try:
            return {"path": path, "weight": float(weight)} if colon and path else {"path": value}
        except ValueError:
            return {"path": value}


class RunConfig(_Strict):
    """Every setting that changes the bytes of the output. Two runs with equal RunConfig and manifest write
    byte-identical tars and parquets."""

    model: str = Field(DEFAULT_MODEL, description="hub id, local path, or 'tiny' (offline random-weight demo model)")
    revision: str | None = Field(None, description="model revision (branch, tag or commit); unset: the default")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="weights and activations; auto: float16 on CUDA, float32 on the CPU"
    )
    family: str | None = Field(
        None, description="model family (sd1, sd2, sdxl, flux, sd3), recognised from the model's config files before any "
        "weights load and recorded in run.json; if set, a model of another family is refused"
    )
    resolution: int | None = Field(
        None, ge=64, le=4096, multiple_of=8, description="square shorthand: width = height = resolution; unset: the "
        "model's native size"
    )
    width: int | None = Field(
        None, ge=64, le=4096, multiple_of=8, description="image width in pixels, a multiple of the model's size unit "
        "(64 for SD 1.x/2.x, 32 for SDXL); unset: resolution"
    )
    height: int | None = Field(
        None, ge=64, le=4096, multiple_of=8, description="image height in pixels, a multiple of the model's size unit; "
        "unset: resolution"
    )
    layers: LayerChoice = Field(
        LayerChoice(), description="the attention layers SeeDiff reads; unset fields come from the model family's "
        "table, and run.json records the result"
    )
    scheduler: Literal[
        "default", "ddim", "pndm", "euler", "euler_a", "dpm++", "dpm++_2m_karras", "unipc", "lcm", "ddim_trailing",
        "euler_trailing", "euler_a_trailing",
    ] = Field(
        "default", description="noise scheduler; default: the model's own (its prediction type is always kept); "
        "lcm and the *_trailing ones (timesteps spaced from the last) are for few-step checkpoints (LCM, SDXL-Turbo, "
        "SDXL-Lightning); flux and sd3 take only their own (default)"
    )
    steps: int = Field(30, ge=1, le=1000, description="denoising steps per image")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="classifier-free guidance scale")
    seed: int = Field(0, ge=0, lt=2**63, description="global seed; each sample's seed is a hash of it and the sample id")
    samples_per_shard: int = Field(1000, ge=1, le=10_000_000, description="samples per tar shard")
    shard_layout: Literal["interleaved", "contiguous"] = Field(
        "interleaved", description="which sample ids a shard holds: interleaved (shard s of S: ids s, s+S, ...; "
        "every shard a proportional mix of the manifest's rows) or contiguous (id ranges; annotate's layout)"
    )
    batch_size: int = Field(8, ge=1, le=1024, description="images generated together on one actor")
    image_format: Literal["jpg", "png", "webp"] = Field("jpg", description="encoding of the image field")
    image_quality: int = Field(95, ge=1, le=100, description="jpg/webp quality")
    prompt_template: str = Field(
        DEFAULT_PROMPT_TEMPLATE, description="prompt for manifest rows without one, and annotate's prompt (the "
        "image's classes listed in place of the class phrase); the manifest's template syntax, marking the class as "
        "{class_name} or {phrase:class_name}"
    )
    negative_prompt: str = Field(
        "", description="negative prompt of every sample whose manifest row has none (the row's own wins)"
    )
    variant: str | None = Field(
        None, description="weight files variant to load, e.g. fp16 (unet/diffusion_pytorch_model.fp16.safetensors, "
        "the half-size files most hub checkpoints ship); unset: the full-precision files"
    )
    lora: tuple[LoraAdapter, ...] = Field(
        (), description="LoRA adapters applied to the model, PATH[:WEIGHT] (weight default 1), repeat the flag for "
        "several; a local .safetensors file or folder, or a hub id (owner/repo[/file.safetensors]); run.json "
        "records each file's sha256", json_schema_extra={"flag": "--lora", "metavar": "PATH[:WEIGHT]"},
    )
    safety_checker: bool = Field(
        True, description="run the checkpoint's safety checker where it ships one (SD 1.x): a flagged image becomes a "
        "failed sample ('nsfw'); --no-safety-checker skips it"
    )
    mask: MaskConfig = Field(MaskConfig(), description="SeeDiff mask settings")
    # Output settings, not runtime options: compiled kernels round floats differently (on the CPU some pixels move
    # by one grey level), so compiled and eager runs write different bytes.
    compile: bool = Field(
        False, description="torch.compile the UNet (with capture installed) and the VAE decoder once per actor"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode with --compile: reduce-overhead adds CUDA graphs"
    )
    output_url: str = Field("", description="output root: local path, s3://..., gs://...", json_schema_extra={"flag": "--out"})
    shard_prefix: str = Field("seediff", pattern=r"^[A-Za-z0-9_]+$", description="shard file name prefix")
    shard_digits: int = Field(6, ge=1, le=12, description="digits of the shard number in file names")
    output_format: int = Field(
        OUTPUT_FORMAT, ge=1, description="version of the shard layout (files, fields, columns), compared on resume",
        json_schema_extra={"flag": RECORDED},
    )
    annotate: AnnotateConfig | None = Field(None, description="set for runs that label real images (seediff annotate)")

    @model_validator(mode="before")
    @classmethod
    def _recorded_layout(cls, data: Any) -> Any:
        """A run.json written before the layout was recorded (it has ``output_format``, no ``shard_layout``) and
        an annotate run are contiguous."""
        if not isinstance(data, dict):
            return data
        if data.get("annotate") is not None and data.get("shard_layout", "contiguous") != "contiguous":
            raise ValueError("shard_layout: annotate keeps its input's order in contiguous shards")
        if "shard_layout" not in data and ("output_format" in data or data.get("annotate") is not None):
            return {**data, "shard_layout": "contiguous"}
        return data

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels: width and height, each defaulting to resolution (the square shorthand). Set
        for every run once the model is recognised (workers/families.py fills the native size)."""
        width, height = self.width or self.resolution, self.height or self.resolution
        if width is None or height is None:
            raise ConfigError("width/height: not set; give resolution or width and height, or resolve the model's "
                              "native size first")
        return width, height

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        class_template(v)  # the manifest's template syntax, exactly (PromptSyntaxError is a ValueError)
        return v

    def negative_prompt_of(self, row_negative_prompt: str) -> str:
        """The negative prompt of a sample whose manifest row has ``row_negative_prompt`` ("" = none)."""
        return row_negative_prompt or self.negative_prompt

    def resolved_dtype(self, device_kind: str) -> str:
        """The dtype actors on ``device_kind`` ("cuda" or "cpu") compute in: auto is fp16 on CUDA, fp32 on the CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if device_kind == "cuda" else "float32"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "run.json") -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}:{e.lineno}: not valid JSON: {e.msg}") from e
        return cls.from_mapping(data, source)

    def differences(self, other: "RunConfig") -> list[str]:
        """Dotted names of the fields whose values differ (nested mask settings as ``mask.<field>``)."""
        a, b = flatten_settings(self.model_dump(mode="json")), flatten_settings(other.model_dump(mode="json"))
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class RuntimeOptions(_Strict):
    """How the run executes; may change between a run and its resume without changing any output byte."""

    num_actors: int | None = Field(
        None, ge=1, description="at most this many actors; unset: one per GPU in the cluster, or 1 CPU actor"
    )
    min_actors: int = Field(1, ge=1, description="keep at least this many actors, even while GPUs are missing")
    max_actors: int | None = Field(None, ge=1, description="never more actors than this, however many GPUs join")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: GPUs when the cluster has them")
    address: str | None = Field(
        None, description="Ray cluster address; unset: RAY_ADDRESS, else a new local cluster"
    )
    max_attempts: int = Field(3, ge=1, description="attempts per shard, across actors")
    shard_timeout_s: float | None = Field(
        None, gt=0, description="seconds a shard may run on its actor before the actor is replaced; unset: adaptive, "
        "4x the slowest completed shard (at least 600 s; 4 h before the first shard completes)",
        json_schema_extra={"flag": "--shard-timeout"},
    )
    actor_startup_timeout_s: float = Field(
        1200.0, gt=0, description="seconds an actor may take to start (scheduling on a node + model load) before it "
        "is replaced", json_schema_extra={"flag": "--actor-startup-timeout"},
    )
    gpu_wait_s: float | None = Field(
        None, ge=0, description="against a cluster address with --device auto or cuda and no GPUs yet: seconds to "
        "wait for GPU nodes to join before giving up (never a silent CPU fallback); unset: 600 where an autoscaler can "
        "add them, else none (the run stops at once, saying so)", json_schema_extra={"flag": "--gpu-wait"},
    )
    transient_retries: int = Field(
        8, ge=0, description="retries per shard, after an exponential backoff with jitter, of transient errors "
        "(network, 5xx, throttling); not counted as attempts"
    )
    allow_device_change: bool = Field(
        False, description="resume on another device kind or dtype than the committed shards (mixes fp16 and fp32 "
        "images)"
    )
    shards_in_flight_per_actor: int = Field(
        2, ge=1, description="shards queued per actor", json_schema_extra={"flag": "--shards-in-flight"}
    )
    encode_threads: int = Field(2, ge=1, description="image encoding threads per actor")
    max_failed_fraction: float = Field(
        0.01, ge=0, le=1, description="the run succeeds (exit 0) only when at most this fraction of its samples "
        "failed in a per-sample stage (prompt, image, safety, labels) and every planned shard is committed"
    )

    def actor_bounds(self) -> tuple[int, int | None]:
        """(min, max) actors: --num-actors N means at most N, like --max-actors."""
        caps = [c for c in (self.num_actors, self.max_actors) if c is not None]
        cap = min(caps) if caps else None
        return (min(self.min_actors, cap) if cap else self.min_actors), cap


def validation_message(error: ValidationError, source: str, written_as: dict[str, str] | None = None) -> str:
    """One line per problem, ``<source>: <dotted.field>: <problem>`` like the manifest's messages, or
    ``<flag>: <problem>`` / ``<file>:<line>: <key>: <problem>`` for a field found in ``written_as``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        got = "" if problem["type"] == "missing" else f" (got {bounded_repr(problem['input'])})"
        where = _written_where(field, written_as or {}) or f"{source}: {field}"
        lines.append(f"{where}: {problem['msg']}{got}")
    return "\n".join(lines)


def _written_where(field: str, written_as: dict[str, str]) -> str | None:
    """Where the user wrote ``field`` or the setting holding it: a list item (``lora.0.weight``) was written as its
    list (``--lora``), named with the rest of the path (``--lora: 0.weight``)."""
    parts = field.split(".")
    for cut in range(len(parts), 0, -1):
        where = written_as.get(".".join(parts[:cut]))
        if where:
            return ": ".join([where, *([".".join(parts[cut:])] if cut < len(parts) else [])])
    return None


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` (e.g. a config file) updated by ``overrides`` (e.g. CLI flags). Nested mappings such as ``mask``
    merge key by key; an override of None means "not given" and keeps the base value."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


def flatten_settings(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names: {"mask": {"refine": "pamr"}} -> {"mask.refine": "pamr"}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


REPR_CHARS = 80  # a value quoted in an error message is cut to this many characters
CONFIG_MAX_BYTES = 1 << 20  # a config file of settings is a few KB
CONFIG_MAX_DEPTH = 16  # nesting of mappings and lists (the settings nest two deep)


def bounded_repr(value: Any) -> str:
    """A short repr of a value quoted in an error message: containers and strings abbreviated (reprlib), then cut
    to ``REPR_CHARS``; never the repr of a whole huge value."""
    text = reprlib.repr(value)
    return text if len(text) <= REPR_CHARS else text[: REPR_CHARS - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader without aliases (``*name``: a 1 KB file of nested aliases expands to gigabytes) and with bounded
    nesting; a config file of settings needs neither."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*{self.peek_event().anchor}) are not allowed in a "
                                 "config file; write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > CONFIG_MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: nested deeper than {CONFIG_MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_config_text(p: Path) -> str:
    try:
        size = p.stat().st_size
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: config file not found") from e
    if size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{p}: {size} bytes; a config file holds at most {CONFIG_MAX_BYTES} bytes of settings")
    return p.read_text(encoding="utf-8")


def _compose(text: str, construct: bool = False) -> Any:
    """The YAML node tree of ``text`` (``construct``: the Python value) under ``_ConfigLoader``'s bounds."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        return loader.construct_document(node) if construct and node is not None else node
    finally:
        loader.dispose()


def yaml_value(text: str) -> Any:
    """A flag's YAML value (a list, a mapping) under the config file's bounds; ValueError (argparse's "invalid
    value") when it does not parse."""
    try:
        return _compose(text, construct=True)
    except yaml.YAMLError as e:
        raise ValueError(str(e)[:200]) from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON config file into a plain dict (validated later, merged with CLI flags). Aliases are refused,
    size and nesting bounded, so a hostile file fails at once instead of expanding."""
    p = Path(path)
    text = _read_config_text(p)
    try:
        data = _compose(text, construct=True)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e)[:300]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of setting names to values")
    return data


def config_file_keys(path: str | Path) -> dict[str, str]:
    """Dotted key -> ``<file>:<line>: <key>`` for every key of a YAML/JSON config file, so that an error names the
    key where the user wrote it (``load_config_file`` has already reported files that do not parse)."""
    p = Path(path)
    try:
        root = _compose(_read_config_text(p))
    except (OSError, ConfigError, yaml.YAMLError):
        return {}
    found: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            found[name] = f"{p}:{key.start_mark.line + 1}: {name}"
            walk(value, f"{name}.")

    walk(root, "")
    return found
