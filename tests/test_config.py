"""Run config: run.json round trip, field-level differences, and errors that name the source and the field."""

import json

import pytest
from pydantic import ValidationError

from seediff.schemas.config import (
    ConfigError,
    MaskConfig,
    RunConfig,
    RuntimeOptions,
    config_file_keys,
    load_config_file,
    merge_settings,
)


def test_run_json_round_trip_keeps_every_field():
    config = RunConfig(
        model="some/model",
        revision="abc123",
        resolution=256,
        scheduler="ddim",
        steps=5,
        seed=2**63 - 1,
        image_format="webp",
        prompt_template="an image of {class_name}",
        mask=MaskConfig(refine="none", capture_steps=(1, 4)),
        output_url="s3://bucket/run",
    )
    text = config.to_json()
    assert RunConfig.from_json(text) == config
    assert json.loads(text)["mask"]["capture_steps"] == [1, 4]
    assert text == RunConfig.from_json(text).to_json()  # stable text: sorted keys, fixed indent


def test_differences_names_nested_fields():
    base = RunConfig()
    other = RunConfig(steps=10, mask=MaskConfig(pamr_iterations=7, refine="none"))
    assert base.differences(other) == ["mask.pamr_iterations", "mask.refine", "steps"]
    assert base.differences(RunConfig()) == []


def test_runtime_options_are_not_part_of_the_run_config():
    assert not set(RuntimeOptions.model_fields) & set(RunConfig.model_fields)


@pytest.mark.parametrize(
    "values,field",
    [
        ({"resolution": 100}, "resolution"),
        ({"steps": 0}, "steps"),
        ({"seed": 2**63}, "seed"),
        ({"image_format": "gif"}, "image_format"),
        ({"shard_prefix": "a/b"}, "shard_prefix"),
        ({"prompt_template": "a photo"}, "prompt_template"),
        ({"mask": {"threshold": 1.5}}, "mask.threshold"),
        ({"mask": {"capture_steps": [5, 2]}}, "mask.capture_steps"),
        ({"stepz": 3}, "stepz"),
    ],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ValidationError) as raw:
        RunConfig.model_validate(values)
    assert {".".join(map(str, e["loc"])) for e in raw.value.errors()} == {field}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(values, "flags")
    assert str(info.value).startswith(f"flags: {field}: ")


def test_from_json_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"^out/run\.json: mask\.pamr_iterations: .*\(got 0\)"):
        RunConfig.from_json('{"mask": {"pamr_iterations": 0}}', "out/run.json")
    with pytest.raises(ConfigError, match=r"^out/run\.json:2: not valid JSON"):
        RunConfig.from_json('{\n"steps": }', "out/run.json")


def test_runtime_options_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^cli: max_attempts: "):
        RuntimeOptions.from_mapping({"max_attempts": 0}, "cli")


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        RunConfig().steps = 3


def test_merge_settings_flags_win_and_nested_mappings_merge():
    file_values = {"steps": 20, "mask": {"refine": "none", "threshold": 0.4}}
    flags = {"steps": None, "seed": 5, "mask": {"threshold": 0.6}}
    merged = merge_settings(file_values, flags)
    assert merged == {"steps": 20, "seed": 5, "mask": {"refine": "none", "threshold": 0.6}}
    assert file_values == {"steps": 20, "mask": {"refine": "none", "threshold": 0.4}}  # inputs untouched
    assert RunConfig.from_mapping(merged, "x").mask.threshold == 0.6


def test_load_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 4\nmask:\n  refine: none\n")
    assert load_config_file(path) == {"steps": 4, "mask": {"refine": "none"}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config_file(empty) == {}


@pytest.mark.parametrize(
    "content,problem",
    [(None, "config file not found"), ("steps: [1\n", "not valid YAML"), ("- 1\n- 2\n", "top level must be")],
)
def test_load_config_file_errors_name_the_file(tmp_path, content, problem):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_an_alias_bomb_or_a_deep_config_is_refused_at_once(tmp_path) -> None:
    """Nine levels of nine aliases expand to 9^9 values: refused at the first alias, the message one short line."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config_file(bomb)
    assert "line 2: aliases (*l0) are not allowed" in str(refused.value) and len(str(refused.value)) < 300
    assert config_file_keys(bomb) == {}
    deep = tmp_path / "deep.yaml"
    deep.write_text("mask: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 16 levels"):
        load_config_file(deep)


def test_an_error_quotes_a_huge_value_in_a_few_characters() -> None:
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_mapping({"resolutoin": ["x" * 10_000] * 10_000}, "c.yaml")
    assert len(str(refused.value)) < 200
