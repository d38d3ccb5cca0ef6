import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from seediff.workers.batch import label_batch
from seediff.workers.generate import GENERATION, NSFW_ERROR

PROMPTS = [
    ("dog", "a photograph of a dog"),
    ("cat", "Cat sleeping on a sofa"),
    ("potted plant", "a long shot of a potted plant in a room"),
]


def test_a_generated_batch_returns_images_masks_and_stats_in_input_order(tiny_pipe, tiny_run_config, make_specs):
    specs = make_specs(PROMPTS[:2], seeds=[11, 12])
    out = label_batch(tiny_pipe, specs, tiny_run_config, GENERATION)
    assert [g.image.spec for g in out] == specs
    for g in out:
        assert g.error is None
        assert g.image.rgb.shape == (64, 64, 3) and g.image.rgb.dtype == np.uint8
        assert g.labels.shape == (64, 64) and g.labels.dtype == np.uint8
        assert set(np.unique(g.labels)) <= {0, g.image.spec.class_id, 255}
        (entry,) = g.mask_stats["classes"]
        assert entry["tokens"] == len(g.image.spec.classes[0].name)  # byte-level tokenizer: one per letter
        assert entry["class_id"] == g.image.spec.class_id
        assert all(isinstance(v, (int, float)) for k, v in g.mask_stats.items() if k != "classes")
    assert label_batch(tiny_pipe, [], tiny_run_config, GENERATION) == []


def test_batch_of_different_prompts_equals_single_runs(tiny_pipe, tiny_run_config, make_specs):
    config = tiny_run_config.model_copy(update={"resolution": 128})  # coarse 4 x 4: non-trivial masks
    specs = make_specs(PROMPTS, seeds=[5, 6, 7])
    batch = label_batch(tiny_pipe, specs, config, GENERATION)
    for spec, together in zip(specs, batch):
        (alone,) = label_batch(tiny_pipe, [spec], config, GENERATION)
        # batched matmuls round differently in the last float bits: at most one grey level apart after quantising
        assert np.abs(together.image.rgb.astype(int) - alone.image.rgb.astype(int)).max() <= 1
        # a pixel whose score sits within that rounding of a threshold may flip (seen: 1 pixel in 16384)
        assert (together.labels != alone.labels).mean() <= 1e-3
        flat = {k: v for k, v in together.mask_stats.items() if k != "classes"}
        assert flat == pytest.approx({k: alone.mask_stats[k] for k in flat}, rel=1e-4, abs=1e-3)
        for mine, theirs in zip(together.mask_stats["classes"], alone.mask_stats["classes"], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-3)
    assert not np.array_equal(batch[0].image.rgb, batch[1].image.rgb)


def test_refine_none_gives_thresholded_soft_map(tiny_pipe, tiny_run_config, make_specs):
    config = tiny_run_config.model_copy(update={"mask": tiny_run_config.mask.model_copy(update={"refine": "none"})})
    (g,) = label_batch(tiny_pipe, make_specs(PROMPTS[:1], seeds=[3]), config, GENERATION)
    assert g.mask_stats["foreground_fraction"] == pytest.approx((g.labels == 1).mean())
    assert g.mask_stats["ignore_fraction"] == pytest.approx((g.labels == 255).mean())


def test_sd2_style_pipeline_generates(tiny_sd2_pipe, tiny_run_config, make_specs):
    out = label_batch(tiny_sd2_pipe, make_specs(PROMPTS[:2], seeds=[1, 2]), tiny_run_config, GENERATION)
    assert all(g.error is None and g.labels.shape == (64, 64) for g in out)


def test_safety_checker_flags_become_failures(tiny_pipe, tiny_run_config, make_specs):
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1),
            vision_config=dict(
                hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                patch_size=8,
            ),
            projection_dim=8,
        )
    ).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine - threshold > 0 for every image: flag everything
    pipe = StableDiffusionPipeline(
        **{
            **tiny_pipe.components,
            "safety_checker": checker,
            "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        }
    )
    pipe.set_progress_bar_config(disable=True)
    out = label_batch(pipe, make_specs(PROMPTS[:2], seeds=[1, 2]), tiny_run_config, GENERATION)
    assert [(g.error, g.image.rgb, g.labels) for g in out] == [(NSFW_ERROR, None, None)] * 2


def test_a_phrase_past_the_context_fails_its_sample_alone(tiny_pipe, tiny_run_config, make_specs):
    specs = make_specs([("dog", "a {class_name}"), ("cat", "x " * 80 + "{class_name}")], seeds=[1, 2])
    ok, failed = label_batch(tiny_pipe, specs, tiny_run_config, GENERATION)
    assert ok.error is None and ok.labels.shape == (64, 64)
    assert failed.image.rgb is None and failed.labels is None
    assert failed.error.startswith("prompt: manifest line 2 (sample 1): labelled phrase 'cat' (class 'cat') ends at token")
