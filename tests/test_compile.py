"""torch.compile (inductor, CPU) of the tiny model with SeeDiff's capture installed: the captured layers trace into the
UNet's one graph (no break, no recompile from batch to batch), their maps equal eager capture's, the images stay
within one grey level of compiled plain generation, and `seediff generate --compile` runs end to end on local Ray.

Inductor compiles take minutes on two shared cores, so each variant compiles once for the module, with one torch
thread and the shapes of COMPILED below: the Ray actor of the end-to-end test then finds every kernel in inductor's
on-disk cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from seediff.pipeline.cli import main
from seediff.workers.batch import install_capture
from seediff.workers.generate import GENERATION, diffusion_inputs
from seediff.workers.models import compile_model, load_model
from tests.e2e_support import SETTINGS, check_dataset, digests, reference_run, run_config, stats_files, write_inputs

# The e2e manifest's 9 samples in one shard of three full batches of 3: one compiled shape. Query blocks of 16 rows put
# the 8x8 self layer in 4 blocks, so both kinds of captured layer are compiled: one-block layers traced by inductor,
# multi-block ones as the seediff::explicit_attention custom op.
COMPILED = {**SETTINGS, "batch_size": 3, "samples_per_shard": 9, "compile": True,
            "mask": {**SETTINGS["mask"], "query_chunk": 16}}
PROMPTS = [("dog", "a photograph of a dog"), ("cat", "Cat sleeping on a sofa"), ("potted plant", "a potted plant")]


@pytest.fixture(scope="module")
def config():
    return run_config("", COMPILED)


@pytest.fixture(scope="module")
def one_thread():
    """Like every CPU actor (and so the same inductor kernels as the end-to-end test's actor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compiled(config, one_thread):
    """(pipeline, capture, compile seconds): the actor's compile path."""
    counters.clear()
    pipe = load_model(config, torch.device("cpu"))
    capture, seconds = install_capture(pipe, config, GENERATION)
    return pipe, capture, seconds


@pytest.fixture(scope="module")
def specs(make_specs):
    return make_specs(PROMPTS, seeds=[5, 6, 7])


def test_captured_layers_trace_into_one_graph_without_recompiles(compiled, config, specs):
    pipe, capture, seconds = compiled
    assert seconds > 0
    # fullgraph=True (compile_model) turns any break into an error; the counter shows none was even attempted
    assert counters["graph_break"] == {}
    blocks = [p.sum.shape[1] // p.query_chunk for p in capture.processors().values()]
    assert 1 in blocks and max(blocks) > 1  # one-block and multi-block layers, both inside the one graph
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the UNet and the VAE decoder
    for window in (None, (1, 2)):  # other weights per call and per batch: the guards still hold
        GENERATION.run(pipe, specs, config.model_copy(update={"mask": config.mask.model_copy(
            update={"capture_steps": window})}), capture)
    assert counters["stats"]["unique_graphs"] == graphs
    assert capture.result().calls == 1


def test_compiled_capture_maps_equal_eager_capture(compiled, config, specs, one_thread):
    pipe, capture, _ = compiled
    got = GENERATION.run(pipe, specs, config, capture).captured
    eager = load_model(config, torch.device("cpu"))
    expected = GENERATION.run(eager, specs, config, None).captured
    assert got.calls == expected.calls == config.steps
    for a, b in zip(got.cross, expected.cross, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(got.self_attn) == len(expected.self_attn) == 3  # one per side of the cascade
    for maps, reference in zip(got.self_attn, expected.self_attn, strict=True):
        torch.testing.assert_close(maps, reference, rtol=0, atol=1e-5)


def test_compiled_capture_images_within_one_grey_level_of_compiled_plain(compiled, config, specs, one_thread):
    pipe, capture, _ = compiled
    got = GENERATION.run(pipe, specs, config, capture).pixels
    plain = load_model(config, torch.device("cpu"))
    compile_model(plain, config.compile_mode)
    reference = plain(**diffusion_inputs(plain, specs, config), output_type="pt")
    assert (got - (reference.images.float() * 255).round()).abs().max() <= 1


# The end-to-end tests share the module's one local Ray (tests/plugins/local_ray.py), started when the first of them
# runs. Their inductor compiles are CPU-bound: on a machine at a load average of 10-15 one took past a 600 s bound
# with nothing wrong; the suite's per-test bound (pyproject.toml) is now one for hangs only.


def test_generate_compile_end_to_end_on_local_ray(compiled, local_ray, tmp_path, capsys):
    """`--compile` through the CLI: a complete, verified dataset; compile time in the stats; the bytes differ from an
    eager run (compiled kernels round floats differently), which is why compile is an output setting of RunConfig
    and a resume without it is refused."""
    eager_settings = {k: v for k, v in COMPILED.items() if k != "compile"}
    manifest, config_file = write_inputs(tmp_path / "inputs", eager_settings)
    out = tmp_path / "out"
    base = ["generate", str(manifest), "--out", str(out), "--config", str(config_file), "--num-actors", "1"]
    assert main([*base, "--compile"]) == 0, capsys.readouterr().err
    check_dataset(out, 9)
    assert main(["verify", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["compile"] is True
    (stats,) = stats_files(out).values()
    assert stats["runtime"]["compile_s"] > 0

    eager = reference_run(manifest, str(tmp_path / "eager"), eager_settings)
    assert digests(out).keys() == eager.keys()
    assert digests(out) != eager  # measured: compiled and eager images differ in some pixels by one grey level

    capsys.readouterr()
    compiled_bytes = digests(out)
    assert main(base) == 2  # the same run without --compile
    assert "differing fields: compile" in capsys.readouterr().err
    assert digests(out) == compiled_bytes


def test_annotate_compile_pays_its_compile_before_the_first_batch(local_ray, tmp_path, capsys):
    """`seediff annotate --compile`: the actor warms the compiled UNet up with an annotate-shaped call (unguided,
    the first timestep), so the compile time is in compile_s, and the output is complete and verified."""
    from tests.annotate_support import write_image_folder

    write_image_folder(tmp_path / "images")  # 5 images: shards of 3 in batches of 3, and a last shard of 2
    out = tmp_path / "out"
    assert main(["annotate", str(tmp_path / "images"), "--out", str(out), "--classes", "dog,cat", "--model", "tiny",
                 "--resolution", "64", "--batch-size", "3", "--samples-per-shard", "3", "--timestep", "100",
                 "--mask-pamr-iterations", "5", "--compile", "--num-actors", "1"]) == 0, capsys.readouterr().err
    assert main(["verify", str(out)]) == 0
    stats = stats_files(out)
    assert sorted((s["count"], s["successes"]) for s in stats.values()) == [(2, 2), (3, 3)]
    # the shard of full batches (the warm-up's shape) runs on compiled code: the compile is in compile_s, not in
    # its generate_s (without the warm-up: compile_s ~1e-5 s and the compile inside the first shard's generate_s)
    (full,) = [s["runtime"] for s in stats.values() if s["count"] == 3]
    assert full["compile_s"] > full["generate_s"]
