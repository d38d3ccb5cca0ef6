import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from seediff.schemas.config import ConfigError, RunConfig
from seediff.workers.adapters import check_variant
from seediff.schemas.manifest import class_row
from seediff.schemas.records import SampleSpec
from seediff.workers.batch import label_batch
from seediff.workers.generate import GENERATION, diffusion_inputs
from seediff.workers.models import (
    SCHEDULERS,
    TINY_MODEL,
    build_tiny_model,
    load_model,
    loading_options,
    offline_clip_tokenizer,
    resolve_device,
    resolve_dtype,
)

CPU = torch.device("cpu")


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", CPU)


def test_offline_tokenizer_round_trips_text():
    tok = offline_clip_tokenizer()
    ids = tok("a potted plant", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "apottedplant"


def test_tiny_pipeline_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_model(), build_tiny_model()
    assert torch.equal(torch.rand(1), expected_next)
    for (name, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.unet.config.block_out_channels == (16, 16, 32, 32)
    assert a.vae_scale_factor == 8


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_choice_maps_to_diffusers_scheduler_and_keeps_the_prediction_type(name, saved_models):
    pipe = load_model(RunConfig(model=TINY_MODEL, scheduler=name), CPU)
    scheduler_class, settings = SCHEDULERS[name]
    assert type(pipe.scheduler) is scheduler_class
    assert all(pipe.scheduler.config[k] == v for k, v in settings.items())
    v_model = load_model(RunConfig(model=saved_models["sd21-768"], scheduler=name), CPU)
    assert v_model.scheduler.config.prediction_type == "v_prediction"


def test_dpm_2m_karras_is_the_second_order_multistep_solver_on_karras_sigmas():
    pipe = load_model(RunConfig(model=TINY_MODEL, scheduler="dpm++_2m_karras"), CPU)
    config = pipe.scheduler.config
    assert (config.algorithm_type, config.solver_order, config.use_karras_sigmas) == ("dpmsolver++", 2, True)


def test_each_family_loads_by_path_with_its_pipeline_class(saved_models):
    classes = {name: type(load_model(RunConfig(model=path), CPU)) for name, path in saved_models.items()}
    assert classes == {"sd1": StableDiffusionPipeline, "sd2-base": StableDiffusionPipeline,
                       "sd21-768": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def test_load_pipeline_from_saved_directory(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path)
    config = RunConfig(model=str(tmp_path), scheduler="euler_a", dtype="float32")
    loaded = load_model(config, CPU)
    assert isinstance(loaded, StableDiffusionPipeline)
    assert isinstance(loaded.scheduler, EulerAncestralDiscreteScheduler)
    assert loaded.unet.dtype == torch.float32 and loaded.safety_checker is None
    for (name, p), q in zip(tiny_pipe.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(p, q), name
    ids = lambda pipe: pipe.tokenizer("a photograph of a dog").input_ids  # noqa: E731
    assert ids(loaded) == ids(tiny_pipe)


def test_variant_fp16_loads_the_variant_files_by_path(tmp_path, tiny_pipe):
    folder = tmp_path / "tiny-fp16"
    build_tiny_model().to(dtype=torch.float16).save_pretrained(folder, variant="fp16")  # half-size files only
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    check_variant(RunConfig(model=str(folder), variant="fp16"))
    with pytest.raises(ConfigError, match="has no 'fp61' weight files"):
        check_variant(RunConfig(model=str(folder), variant="fp61"))
    loaded = load_model(RunConfig(model=str(folder), variant="fp16", dtype="float32"), CPU)
    assert loaded.unet.dtype == torch.float32
    for (name, p), q in zip(tiny_pipe.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(p.half().float(), q), name  # the fp16 files' values, upcast


def _with_safety_checker(folder):
    """The tiny SD1.x saved with a (random, tiny) safety checker and its feature extractor, as SD 1.5 ships."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    clip = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    pipe = build_tiny_model()
    torch.manual_seed(0)
    pipe.register_modules(safety_checker=StableDiffusionSafetyChecker(clip).eval(),
                          feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(folder)
    return str(folder)


def test_the_safety_checker_can_be_switched_off(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    model = _with_safety_checker(tmp_path / "with-checker")
    assert isinstance(load_model(RunConfig(model=model), CPU).safety_checker, StableDiffusionSafetyChecker)
    assert load_model(RunConfig(model=model, safety_checker=False), CPU).safety_checker is None
    # SDXL pipelines have none to switch off: nothing is passed
    assert loading_options(RunConfig(safety_checker=False), StableDiffusionXLPipeline) == {}


def test_run_wide_negative_prompt_reaches_the_pipeline_and_a_rows_own_wins(tiny_pipe, tiny_run_config, make_specs):
    specs = make_specs([("cat", "a photo of a {cat}"), ("dog", "a photo of a {dog}")], [1, 2])
    own = SampleSpec(2, 2, 0, 3, class_row("bird", 3, 1, "a {bird}", "grainy", 3))
    config = tiny_run_config.model_copy(update={"negative_prompt": "blurry, low quality"})
    calls = []

    class Called(Exception):
        pass

    def recording(pipe, *args, **kwargs):  # the call's arguments are what this test is about: no need to run it
        calls.append(kwargs)
        raise Called

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Called):
        patch.setattr(type(tiny_pipe), "__call__", recording)
        label_batch(tiny_pipe, [*specs, own], config, GENERATION)
    assert calls[0]["negative_prompt"] == ["blurry, low quality", "blurry, low quality", "grainy"]
    assert diffusion_inputs(tiny_pipe, specs, tiny_run_config)["negative_prompt"] == ["", ""]  # unset: none
