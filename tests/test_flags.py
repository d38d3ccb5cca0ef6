"""Flags generated from the settings models: every field of RunConfig, MaskConfig and RuntimeOptions has a
description and a flag, ``--help`` shows each default, flag values reach the models typed, and errors name the flag
or the config-file key (with its line) that the user wrote."""

from __future__ import annotations

import re
import types
import typing

import pytest
from pydantic import BaseModel

from seediff.pipeline.cli import build_parser, main, settings
from seediff.pipeline.flags import flag_name
from seediff.schemas.config import ConfigError, MaskConfig, RunConfig, RuntimeOptions

MODELS = {"": RunConfig, "mask.": MaskConfig, "runtime:": RuntimeOptions}


def fields(models=MODELS):
    """(dotted name, FieldInfo) of every setting, nested models (optional ones too) flattened."""
    for prefix, model in models.items():
        yield from _flattened(model, prefix.replace("runtime:", ""))


def _flattened(model: type[BaseModel], prefix: str):
    for name, info in model.model_fields.items():
        annotation = info.annotation
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)  # not a list's element model
        options = [a for a in typing.get_args(annotation) if a is not type(None)] if optional else [annotation]
        nested = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _flattened(nested[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare with single spaces


def test_every_field_has_a_description_and_a_flag_with_its_default_in_help(capsys):
    text = help_text("generate", capsys)
    checked = 0
    settings_fields = [(f, i) for f, i in fields() if not f.startswith("annotate.")]  # annotate's own: below
    for field, info in settings_fields:
        assert info.description, f"{field} has no description"
        flag = flag_name(field, info)
        if flag is None:  # recorded in run.json, not a setting (output_format)
            continue
        if flag == "--out":  # the output root: required, it has no default
            assert f"--out OUT {info.description} (required)" in text
            continue
        default = info.get_default()
        shown = "unset" if default in (None, "", ()) else " ".join(map(str, default)) if isinstance(default, tuple) else default
        assert re.search(re.escape(flag) + r"[ ,]", text), f"no flag for {field}"  # "--x INT" or "--x, --no-x"
        assert f"{info.description} (default: {shown})" in text, f"{flag}: help lacks description or default"
        checked += 1
    assert checked == len(settings_fields) - 2  # every field but --out and the recorded output_format


def test_every_annotate_setting_has_a_flag_in_annotate_help(capsys):
    text = help_text("annotate", capsys)
    annotate_fields = [(f, i) for f, i in fields() if f.startswith("annotate.")]
    assert annotate_fields
    for field, info in annotate_fields:
        assert info.description, f"{field} has no description"
        flag = "--timestep" if field == "annotate.timesteps" else flag_name(field, info)  # repeatable
        assert re.search(re.escape(flag) + r"[ ,]", text), f"no flag for {field}"


def test_resume_takes_only_runtime_options(capsys):
    text = help_text("resume", capsys)
    for name, info in RuntimeOptions.model_fields.items():
        assert flag_name(name, info) in text
    assert "--steps" not in text and "--mask-refine" not in text
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["resume", "out", "--steps", "3"])
    assert exit_info.value.code == 2


def test_flag_values_reach_the_models_typed(tmp_path):
    args = build_parser().parse_args([
        "generate", "m.csv", "--out", "s3://b/o", "--guidance-scale", "3.5", "--scheduler", "ddim",
        "--dtype", "float32", "--image-format", "png", "--mask-capture-steps", "1", "4", "--mask-refine", "none",
        "--shard-timeout", "60", "--shards-in-flight", "3", "--prompt-template", "a {class_name} at 100%",
    ])
    config, runtime, _ = settings(args)
    assert (config.guidance_scale, config.scheduler, config.dtype, config.image_format) == (3.5, "ddim", "float32", "png")
    assert (config.mask.capture_steps, config.mask.refine) == ((1, 4), "none")
    assert (runtime.shard_timeout_s, runtime.shards_in_flight_per_actor) == (60.0, 3)
    assert config.prompt_template == "a {class_name} at 100%"
    assert config.mask.pamr_iterations == MaskConfig().pamr_iterations  # untouched fields keep their defaults


def test_model_loading_flags_reach_the_run_settings(tmp_path):
    args = build_parser().parse_args([
        "generate", "m.csv", "--out", "o", "--lora", "a.safetensors:0.5", "--lora", "s3://b/x.safetensors",
        "--variant", "fp16", "--negative-prompt", "blurry", "--no-safety-checker",
    ])
    config, _, _ = settings(args)
    assert [(a.path, a.weight) for a in config.lora] == [("a.safetensors", 0.5), ("s3://b/x.safetensors", 1.0)]
    assert (config.variant, config.negative_prompt, config.safety_checker) == ("fp16", "blurry", False)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lora: [{path: b.safetensors, weight: 0.25}, c.safetensors:2]\nsafety_checker: off\n")
    config, _, _ = settings(build_parser().parse_args(["generate", "m.csv", "--out", "o", "--config", str(config_file)]))
    assert [(a.path, a.weight) for a in config.lora] == [("b.safetensors", 0.25), ("c.safetensors", 2.0)]
    assert config.safety_checker is False and RunConfig().safety_checker is True
    with pytest.raises(ConfigError, match="--lora"):
        settings(build_parser().parse_args(["generate", "m.csv", "--out", "o", "--lora", "a.safetensors:99"]))


def test_errors_name_the_flag_or_the_file_line_and_key(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("class_name,num_samples\ncat,2\n")
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: tiny\nmask:\n  refine: pamr\n  pamr_iterations: 0\nshard_timeout_s: -1\n")
    base = ["generate", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    assert main([*base, "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert f"{config_file}:4: mask.pamr_iterations: Input should be greater than or equal to 1" in err
    assert f"{config_file}:5: shard_timeout_s: Input should be greater than 0" in err
    assert main([*base, "--config", str(config_file), "--mask-pamr-iterations", "5", "--shard-timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert "--shard-timeout: Input should be greater than 0 (got 0.0)" in err and "pamr_iterations" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
