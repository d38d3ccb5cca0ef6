"""LoRA adapters of a run (``RunConfig.lora``): where each file is, its sha256, whether it fits the model, and applying
them to a loaded pipeline with diffusers' own adapter API (peft backend).

The check runs on the driver during validation, before Ray starts and before any weights load: it reads only the
safetensors *headers* (tensor names and shapes) of the adapter and of the model's component weight files, never a
tensor, and imports no torch (except for the in-memory ``tiny`` model, whose weights exist only once built). An
adapter that is missing, unreadable, or names layers the model lacks or shapes it does not have is a ``ConfigError``
naming it. Formats: diffusers/peft (``unet.<module>.lora_A.weight``; the older ``.lora.down.weight`` and attention-
processor names), kohya (``lora_unet_<module_with_underscores>.lora_down.weight``, ``lora_te[12]_...``); kohya files
named after the original LDM layers (``input_blocks``...) are converted by diffusers at load, so only their header is
checked here. The weight ``variant`` a run loads is checked here too, against a local model folder's files."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from seediff.schemas.config import TINY_MODEL, ConfigError, LoraAdapter, RunConfig

# the adapter file of a folder, when it holds several .safetensors files (diffusers' save_lora_weights name)
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# key prefix of a diffusers/peft adapter -> pipeline component; kohya's prefixes
COMPONENT_PREFIXES = ("unet", "text_encoder", "text_encoder_2", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
LDM_NAMES = ("input_blocks", "middle_block", "output_blocks")  # kohya files of the original SD layer names
# weight file names of a component folder: diffusers models, transformers models
WEIGHT_FILES = ("diffusion_pytorch_model", "model")
MAX_HEADER_BYTES = 100 * 2**20
HASH_CHUNK = 8 * 2**20


# ---- validation (driver, no torch) ----------------------------------------------------------------------------------


def check_variant(config: RunConfig) -> None:
    """A local model folder must hold weight files of the run's ``variant`` (``unet/...fp16.safetensors``), which
    the adapters' check reads too; a hub model's are found at load."""
    if not config.variant:
        return
    if config.model == TINY_MODEL:
        raise ConfigError("variant: the tiny model is built in memory; it has no weight files to choose from")
    local = Path(config.model).expanduser()
    patterns = (f"*/*.{config.variant}.safetensors", f"*/*.{config.variant}.bin", f"*/*.index.{config.variant}.json")
    if local.is_dir() and not any(next(local.glob(p), None) for p in patterns):
        raise ConfigError(f"variant: {config.model} has no {config.variant!r} weight files (e.g. "
                          f"unet/diffusion_pytorch_model.{config.variant}.safetensors)")


def check_adapters(config: RunConfig) -> RunConfig:
    """``config`` with each adapter's sha256 filled in, once every adapter is found, readable and fits the model's
    layers; a recorded sha256 (a resumed run, or set by the user) must match the file. ``ConfigError`` names the
    adapter (``lora[i] PATH``) and what is wrong."""
    if not config.lora:
        return config
    checked = []
    for i, adapter in enumerate(config.lora):
        where = f"lora[{i}] {adapter.path}"
        path = adapter_file(adapter, config, where)
        digest = file_sha256(path, where)
        if adapter.sha256 is not None and adapter.sha256 != digest:
            raise ConfigError(f"{where}: the file's sha256 is {digest}, not the {adapter.sha256} recorded for this run "
                              "(the adapter changed); use the recorded file, or start another output")
        check_fits(read_header(path, where), config, where)
        checked.append(adapter.model_copy(update={"sha256": digest}))
    return config.model_copy(update={"lora": tuple(checked)})


def adapter_file(adapter: LoraAdapter, config: RunConfig, where: str) -> Path:
    """The adapter's safetensors file on this machine: a local file, the one file of a local folder (or its
    ``pytorch_lora_weights.safetensors``), or a hub file (``owner/repo`` holding one such file, or
    ``owner/repo/file.safetensors``), downloaded once into the hub cache."""
    local = Path(adapter.path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        return _folder_file(sorted(local.glob("*.safetensors")), local, where)
    if local.is_absolute() or adapter.path.startswith((".", "~")) or adapter.path.count("/") < 1:
        raise ConfigError(f"{where}: not found (no such file or folder, and not a hub id owner/repo)")
    return _hub_file(adapter.path, where)


def _folder_file(files: list[Path], folder: Any, where: str) -> Any:
    named = [f for f in files if f.name == DEFAULT_WEIGHT_NAME]
    if len(files) == 1 or named:
        return (named or files)[0]
    found = (f"{len(files)} .safetensors files and none named {DEFAULT_WEIGHT_NAME}" if files
             else "no .safetensors file")
    raise ConfigError(f"{where}: {folder} holds {found}; name the file")


def _hub_file(path: str, where: str) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    from seediff.workers.families import hub_resolves

    owner, repo, *rest = path.split("/")
    repo_id, filename = f"{owner}/{repo}", "/".join(rest) or None
    try:
        if filename is None:
            if not hub_resolves():
                raise ConfigError(f"{where}: the hub is unreachable; name the file (owner/repo/file.safetensors) if "
                                  "it is cached, or give a local path")
            files = [Path(f) for f in HfApi().list_repo_files(repo_id) if f.endswith(".safetensors")]
            filename = str(_folder_file(files, repo_id, where))
        return Path(hf_hub_download(repo_id, filename, local_files_only=not hub_resolves()))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown repo or file, offline and not cached, gated: the run cannot start
        raise ConfigError(f"{where}: cannot read it from the hub: {type(e).__name__}: {e}") from e


def file_sha256(path: Path, where: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e}") from e
    return digest.hexdigest()


def read_header(path: Path, where: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8-byte length, then JSON), without reading a tensor."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{where}: {path} is not a readable safetensors file ({e})") from e
    tensors = {name: info.get("shape") for name, info in header.items() if name != "__metadata__"}
    if not tensors or not all(isinstance(shape, list) for shape in tensors.values()):
        raise ConfigError(f"{where}: {path} holds no tensors")
    return tensors


def check_fits(adapter: dict[str, list[int]], config: RunConfig, where: str) -> None:
    """Every layer the adapter changes exists in the model with the adapter's input and output widths."""
    targets = adapter_targets(adapter, where)
    problems, compared = [], 0
    for component, layers in targets.items():
        model = model_weights(config, component)
        if model is None:  # no header to compare with (e.g. .bin weights): diffusers checks at load
            continue
        by_underscores = {name.replace(".", "_"): name for name in _modules(model)}
        for layer, (in_width, out_width) in sorted(layers.items()):
            module = layer if f"{layer}.weight" in model else by_underscores.get(layer)
            if module is None:
                problems.append(f"{component}.{layer}: no such layer")
                continue
            shape = model[f"{module}.weight"]
            compared += 1
            if (in_width is not None and len(shape) > 1 and shape[1] != in_width) or (
                    out_width is not None and shape[0] != out_width):
                problems.append(f"{component}.{module}: the adapter maps {in_width} -> {out_width} features, the "
                                f"model's layer {shape[1] if len(shape) > 1 else '?'} -> {shape[0]}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(f"{where}: does not match the layers of {config.model} ({len(problems)} of "
                          f"{len(problems) + compared} layers): {shown}")


def adapter_targets(adapter: dict[str, list[int]], where: str) -> dict[str, dict[str, tuple[int | None, int | None]]]:
    """component -> layer -> (input width, output width) the adapter's down/up matrices expect. Kohya layers keep
    their underscore names (matched against the model's with dots as underscores); LDM-named kohya layers, which
    diffusers renames at load, are left out."""
    targets: dict[str, dict[str, list[int | None]]] = {}
    recognised = 0
    for name, shape in adapter.items():
        found = _split_key(name)
        if found is None:
            continue
        recognised += 1
        component, layer, role = found
        if component is None:
            continue
        widths = targets.setdefault(component, {}).setdefault(layer, [None, None])
        if role == "down" and len(shape) >= 2:
            widths[0] = shape[1]
        elif role == "up" and shape:
            widths[1] = shape[0]
    if not recognised:
        raise ConfigError(f"{where}: no LoRA weights in it (no lora_A/lora_B, lora.down/lora.up or kohya "
                          f"lora_down/lora_up tensors); first names: {', '.join(sorted(adapter)[:3])}")
    return {c: {k: (v[0], v[1]) for k, v in layers.items()} for c, layers in targets.items()}


def _split_key(name: str) -> tuple[str | None, str, str] | None:
    """(component, layer, "down"/"up"/"other") of an adapter tensor name, component None for a layer not checked;
    None for a tensor that is not LoRA weights at all."""
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
                         (".alpha", "other"), (".lora_magnitude_vector", "other"), (".dora_scale", "other")):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        return None
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            layer = stem[len(prefix):]
            return (None if any(layer.startswith(ldm) for ldm in LDM_NAMES) else component), layer, role
    head, _, rest = stem.partition(".")
    if head in COMPONENT_PREFIXES and rest:
        component, layer = head, rest
    else:  # the oldest diffusers files: UNet attention-processor names without a prefix
        component, layer = "unet", stem
    if ".processor." in layer:  # down_blocks.0...attn1.processor.to_q_lora -> down_blocks.0...attn1.to_q
        parent, _, projection = layer.rpartition(".processor.")
        layer = f"{parent}.{projection.removesuffix('_lora').replace('to_out', 'to_out.0')}"
    return component, layer, role


def _modules(weights: dict[str, list[int]]) -> list[str]:
    return [name.removesuffix(".weight") for name in weights if name.endswith(".weight")]


def model_weights(config: RunConfig, component: str) -> dict[str, list[int]] | None:
    """Parameter name -> shape of a component of the model, from its weight files' headers (the variant's when the
    run loads one); None when the model has no readable safetensors header for it. ``ConfigError`` when the model
    has no such component at all."""
    if config.model == TINY_MODEL:
        from seediff.workers.models import build_tiny_model  # built in memory: torch, but only for the test model

        module = getattr(build_tiny_model(), component, None)
        if module is None:
            raise ConfigError(f"lora: the tiny model has no {component}")
        return {name: list(p.shape) for name, p in module.state_dict().items()}
    files = _component_files(config, component)
    if files is None:
        return None
    weights: dict[str, list[int]] = {}
    for path in files:
        weights.update(read_header(path, f"model {config.model}"))
    return weights


def _component_files(config: RunConfig, component: str) -> list[Path] | None:
    """The safetensors files of a component: a local folder's, or those already in the hub cache."""
    variant = f".{config.variant}" if config.variant else ""
    local = Path(config.model).expanduser()
    for stem in WEIGHT_FILES:
        single = f"{component}/{stem}{variant}.safetensors"
        index = f"{component}/{stem}.safetensors.index{variant}.json"
        if local.is_dir():
            if not (local / component).is_dir():
                raise ConfigError(f"lora: {config.model} has no {component}, which the adapter changes")
            if (local / single).is_file():
                return [local / single]
            if (local / index).is_file():
                shards = json.loads((local / index).read_text(encoding="utf-8"))["weight_map"].values()
                return [local / component / name for name in sorted(set(shards))]
            continue
        cached = _cached(config, single)
        if cached is not None:
            return [cached]
    return None


def _cached(config: RunConfig, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(config.model, filename, revision=config.revision)
    return Path(found) if isinstance(found, str) else None


# ---- applying (actor) -----------------------------------------------------------------------------------------------


def apply_adapters(pipe: Any, config: RunConfig) -> None:
    """Load the run's adapters into ``pipe`` (diffusers ``load_lora_weights``, peft backend), each at its weight,
    and fuse them into the base weights: the layers are plain linear/conv layers again, as fast as the model without
    an adapter (kept active, every adapted layer runs two extra matmuls; see bench/RESULTS.md), and the capture
    processors and torch.compile see the model they always see. The file read must be the one validated: its
    sha256 is compared with the recorded one."""
    if not config.lora:
        return
    from safetensors.torch import load as load_safetensors

    names = []
    for i, adapter in enumerate(config.lora):
        where = f"lora[{i}] {adapter.path}"
        path = adapter_file(adapter, config, where)
        data = path.read_bytes()
        if adapter.sha256 is not None and hashlib.sha256(data).hexdigest() != adapter.sha256:
            raise ConfigError(f"{where}: {path} changed since the run was validated (sha256 differs)")
        names.append(f"lora_{i}")
        pipe.load_lora_weights(load_safetensors(data), adapter_name=names[-1])
    pipe.set_adapters(names, adapter_weights=[adapter.weight for adapter in config.lora])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # drops the adapter modules; the fused weights stay
