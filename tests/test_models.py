import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from seediff.schemas.config import RunConfig
from seediff.workers.models import (
    SCHEDULERS,
    TINY_MODEL,
    build_tiny_model,
    load_model,
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
