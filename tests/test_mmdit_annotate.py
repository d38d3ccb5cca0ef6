"""annotate on MM-DiTs: a real image is noised the family's own way (flow matching: x_t = (1 - s) x + s e, s = t /
1000) and read by one conditional transformer call per timestep under the same capture; every image is labelled at
its own size with the run's ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seediff.pipeline.sources import AnnotatePlan, open_input
from seediff.schemas.config import AnnotateConfig, MaskConfig, RunConfig
from seediff.workers.annotate import ANNOTATION
from seediff.workers.batch import label_batch
from seediff.workers.families import resolve
from seediff.workers.models import noise_latents
from tests.annotate_support import IMAGES, write_image_folder


def test_flow_families_noise_by_interpolation_and_unets_by_their_schedule(mmdit_pipes, tiny_pipe):
    x, e = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t = torch.tensor([0, 250])
    for pipe in mmdit_pipes.values():
        noised = noise_latents(pipe, x, e, t)
        torch.testing.assert_close(noised[0], x[0])
        torch.testing.assert_close(noised[1], 0.75 * x[1] + 0.25 * e[1])
    a = tiny_pipe.scheduler.alphas_cumprod[250]
    torch.testing.assert_close(noise_latents(tiny_pipe, x, e, t)[1], a.sqrt() * x[1] + (1 - a).sqrt() * e[1])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_mmdit_annotates_every_image_at_its_size(mmdit_pipes, saved_mmdits, tmp_path, family) -> None:
    config, _ = resolve(RunConfig(model=saved_mmdits[family], width=192, height=128, batch_size=len(IMAGES),
                                  annotate=AnnotateConfig(timesteps=(100, 300)), mask=MaskConfig(pamr_iterations=5)))
    write_image_folder(tmp_path / "images")
    plan = AnnotatePlan(open_input(str(tmp_path / "images"), ["dog", "cat"], None), config)
    annotated = label_batch(mmdit_pipes[family], plan.samples(plan.shard(0)), config, ANNOTATION)
    assert [a.error for a in annotated] == [None] * len(IMAGES)
    for result, (width, height, _, _) in zip(annotated, IMAGES):
        assert result.labels.shape == (height, width)
        assert set(np.unique(result.labels)) <= {0, 1, 2, 255}
        assert [c["class_id"] for c in result.mask_stats["classes"]] == [1, 2]
        assert all(c["num_cross_maps"] > 0 for c in result.mask_stats["classes"])
