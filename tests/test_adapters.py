"""LoRA adapters (workers/adapters.py): a LoRA made here from the tiny model's UNet (peft, random weights, saved as
safetensors by diffusers) changes the images, at weight 0 it leaves them as they are; run.json records each adapter
with its sha256, and a run with another adapter (or a changed file) is refused; a missing, unreadable or mismatched
adapter exits 2 naming it, before Ray, from the safetensors headers alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from seediff.pipeline.cli import main
from seediff.schemas.config import ConfigError, RunConfig, RuntimeOptions
from seediff.schemas.manifest import load_manifest
from seediff.workers.actor import ShardActor
from seediff.workers.adapters import check_adapters
from seediff.workers.families import resolve
from seediff.workers.generate import diffusion_inputs
from seediff.workers.models import build_tiny_model, load_model
from tests.e2e_support import plan_of

CPU = torch.device("cpu")
SETTINGS = ["--model", "tiny", "--resolution", "64", "--steps", "2", "--mask-pamr-iterations", "5"]
LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # 16 -> 16 features in the tiny UNet


def make_lora(folder: Path, seed: int) -> Path:
    """A rank-4 LoRA on every attention projection of the tiny UNet, random A and B (peft's init_lora_weights=False),
    saved with diffusers' save_lora_weights: pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_tiny_model().unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return make_lora(root / "a", seed=0), make_lora(root / "b", seed=1)


def images(config: RunConfig, make_specs) -> torch.Tensor:
    pipe = load_model(config, CPU)
    specs = make_specs([("cat", "a photo of a {cat}")], [7])
    return pipe(**diffusion_inputs(pipe, specs, config), output_type="pt").images


def test_a_lora_changes_the_images_and_at_weight_0_leaves_them_as_they_are(loras, tiny_run_config, make_specs):
    lora, _ = loras

    def with_lora(text: str | None) -> RunConfig:
        config = RunConfig.model_validate({**tiny_run_config.model_dump(), "lora": [text] if text else []})
        return check_adapters(resolve(config)[0])

    plain = images(with_lora(None), make_specs)
    assert not torch.equal(images(with_lora(str(lora)), make_specs), plain)
    assert torch.equal(images(with_lora(f"{lora.parent}:0"), make_specs), plain)  # the folder names its one file


def test_run_json_records_the_adapter_and_another_adapter_is_refused(loras, tmp_path, capsys):
    lora, other = loras
    manifest_file = tmp_path / "m.csv"
    manifest_file.write_text("class_name,num_samples\ncat,2\n")
    out = tmp_path / "out"
    config = check_adapters(resolve(RunConfig(
        model="tiny", resolution=64, steps=2, batch_size=2, mask={"pamr_iterations": 5}, lora=[f"{lora}:0.5"],
        output_url=str(out),
    ))[0])
    from seediff.pipeline.resume import prepare_output

    manifest = load_manifest(str(manifest_file))
    prepare_output(config, manifest, overwrite=False)
    plan = plan_of(manifest, config)
    ShardActor(config, RuntimeOptions(device="cpu"), plan, torch_threads=1).generate_shard(plan.shard(0))
    recorded = json.loads((out / "run.json").read_text())["config"]["lora"]
    assert recorded == [{"path": str(lora), "weight": 0.5, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    argv = ["generate", str(manifest_file), "--out", str(out), *SETTINGS, "--batch-size", "2"]
    assert main([*argv, "--lora", f"{lora}:0.5", "--dry-run"]) == 0  # the same adapter: the run would resume
    assert f"lora: {lora} at weight 0.5 (sha256 {recorded[0]['sha256'][:12]})" in capsys.readouterr().out
    assert main([*argv, "--lora", f"{other}:0.5"]) == 2  # another adapter, same weight
    assert "differing fields: lora" in capsys.readouterr().err
    assert main([*argv, "--lora", f"{lora}:0.7"]) == 2  # the same adapter at another weight
    assert "differing fields: lora" in capsys.readouterr().err
    lora.write_bytes(other.read_bytes())  # the recorded file itself changed
    try:
        assert main(["resume", str(out)]) == 2
        assert "not the" in capsys.readouterr().err
    finally:
        make_lora(lora.parent, seed=0)


def test_missing_unreadable_or_mismatched_adapters_exit_2_naming_them_before_ray(loras, tmp_path, capsys):
    import ray

    lora, _ = loras
    manifest_file = tmp_path / "m.csv"
    manifest_file.write_text("class_name,num_samples\ncat,2\n")
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("not a safetensors file")
    wide = tmp_path / "wide.safetensors"  # a layer of the tiny UNet, with other widths
    save_file({f"{LAYER}.lora_A.weight": torch.zeros(4, 24), f"{LAYER}.lora_B.weight": torch.zeros(16, 4)}, wide)
    elsewhere = tmp_path / "elsewhere.safetensors"  # a layer the tiny UNet does not have
    save_file({"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 16)}, elsewhere)
    kohya = tmp_path / "kohya.safetensors"  # kohya names of the same UNet's layers fit
    kohya_layer = "lora_unet_" + LAYER.removeprefix("unet.").replace(".", "_")
    save_file({f"{kohya_layer}.lora_down.weight": torch.zeros(4, 16),
               f"{kohya_layer}.lora_up.weight": torch.zeros(16, 4), f"{kohya_layer}.alpha": torch.tensor(4.0)}, kohya)
    cases = {
        tmp_path / "missing.safetensors": "not found",
        not_safetensors: "not a readable safetensors file",
        wide: "adapter maps 24 -> 16 features, the model's layer 16 -> 16",
        elsewhere: "down_blocks.7.attentions.0.proj_in: no such layer",
        tmp_path: "none named pytorch_lora_weights.safetensors; name the file",  # a folder of several
    }
    base = ["generate", str(manifest_file), "--out", str(tmp_path / "out"), *SETTINGS]
    for path, message in cases.items():
        assert main([*base, "--lora", str(lora), "--lora", f"{path}:0.5"]) == 2
        err = capsys.readouterr().err
        assert f"lora[1] {path}: " in err and message in err, err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
    check_adapters(RunConfig(model="tiny", lora=[str(kohya)]))  # no error
    with pytest.raises(ConfigError, match="no LoRA weights"):
        plain = tmp_path / "plain.safetensors"
        save_file({"weight": torch.zeros(2)}, plain)
        check_adapters(RunConfig(model="tiny", lora=[str(plain)]))
