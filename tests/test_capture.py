import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from seediff.workers.attention_kernels import add_head_summed_probabilities
from seediff.workers.capture import (
    AttentionSum,
    SeeDiffCapture,
    UnsupportedUNetError,
    _attention_output,
    default_path,
    installed_processors,
    locate_attention_layers,
    plan_seediff_layers,
)
from seediff.workers.families import default_layers
from seediff.workers.models import SCHEDULERS

LATENT = 8  # 64 px with the VAE's factor 8


class RecordingAttnProcessor(AttnProcessor):
    """Naive reference: diffusers' explicit-probability processor, keeping every conditional-half map of every
    call (heads kept apart), averaged only afterwards."""

    def __init__(self, n_samples: int):
        super().__init__()
        self.n_samples = n_samples
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        explicit_scores = attn.get_attention_scores

        def record(query, key, mask=None):
            probs = explicit_scores(query, key, mask)  # [batch * heads, Lq, Lk]
            per_sample = probs.view(-1, attn.heads, *probs.shape[1:])
            self.maps.append(per_sample[-self.n_samples :].clone())
            return probs

        attn.get_attention_scores = record
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores

    def average(self, calls=slice(None)) -> torch.Tensor:
        return torch.stack(self.maps[calls]).mean(0).sum(1)  # time average, then head sum: [B, Lq, Lk]


def run(pipe, prompts, steps=2, guidance=6.0, seed=0, **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=generators, **kwargs
    )


def captured_run(pipe, prompts, positions, steps=2, guidance=6.0, seed=0, window=None, **capture_options):
    """One batch under a capture installed for it: (latents, the capture)."""
    capture = SeeDiffCapture(pipe.unet, LATENT, len(prompts), guided=guidance > 1, **capture_options)
    with capture.begin(positions, window):
        latents = run(pipe, prompts, steps, guidance, seed, output_type="latent", callback_on_step_end=capture.step_end)
    return latents.images, capture


def test_locate_layers_from_structure(tiny_pipe):
    layers = locate_attention_layers(tiny_pipe.unet, LATENT)
    assert len(layers) == len(tiny_pipe.unet.attn_processors) == 20
    assert [l.order for l in layers] == list(range(20))
    assert {l.key for l in layers} == set(tiny_pipe.unet.attn_processors)
    by_block = {(l.block, l.block_index, l.kind): l.grid for l in layers}
    assert by_block[("down", 0, "self")] == (8, 8) and by_block[("down", 2, "cross")] == (2, 2)
    assert by_block[("mid", 0, "self")] == (1, 1)
    assert by_block[("up", 1, "self")] == (2, 2) and by_block[("up", 3, "cross")] == (8, 8)
    assert all(l.heads == 2 for l in layers)
    # the grid follows the latent size, including odd sizes (stride-2 convolutions round up) and h != w
    assert {l.grid for l in locate_attention_layers(tiny_pipe.unet, 13)} == {(13, 13), (7, 7), (4, 4), (2, 2)}
    assert {l.grid for l in locate_attention_layers(tiny_pipe.unet, (8, 12))} == {(8, 12), (4, 6), (2, 3), (1, 2)}


def test_plan_picks_coarse_cross_and_first_up_self_layers(tiny_pipe):
    plan = plan_seediff_layers(locate_attention_layers(tiny_pipe.unet, LATENT), LATENT)
    assert [(l.block, l.block_index) for l in plan.cross] == [("down", 2), ("up", 1), ("up", 1)]
    assert all(l.kind == "cross" and l.grid == (2, 2) for l in plan.cross)
    assert [l.key for l in plan.self_attn] == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1.processor",
    ]
    assert plan.grids == ((2, 2), (4, 4), (8, 8)) and plan.key_pool == (1, 1, 1)


def test_only_planned_layers_are_captured_and_restored(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    capture = SeeDiffCapture(tiny_pipe.unet, LATENT, 1)
    planned = {l.key for l in capture.plan.cross} | {l.key for l in capture.plan.self_attn}
    with capture:
        inside = tiny_pipe.unet.attn_processors
        assert {k for k, p in inside.items() if isinstance(p, AttentionSum)} == planned
        assert all(type(p) is AttnProcessor2_0 for k, p in inside.items() if k not in planned)
    after = tiny_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_capture_leaves_generation_unchanged(tiny_pipe):
    prompts = ["a photograph of a dog", "a long shot of a potted plant"]
    plain = run(tiny_pipe, prompts, output_type="latent").images
    captured, _ = captured_run(tiny_pipe, prompts, [[5], [7, 8]])
    # Off CUDA the conditional half's attention is computed explicitly (probs @ V), not by fused SDPA: equal up to
    # fp32 rounding. For scale: diffusers' own explicit AttnProcessor on the same layers differs by 9e-6 here
    # (latents up to 6.3).
    torch.testing.assert_close(captured, plain, rtol=0, atol=2e-5)


class FusedThroughCaptureOutput:
    """The capture processors' output path (projections, attention product, output projection) with fused SDPA as
    the product: what a captured layer computes on a GPU, where the whole batch keeps fused SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return _attention_output(
            attn, hidden_states, encoder_hidden_states, temb, lambda a, q, k, v: F.scaled_dot_product_attention(q, k, v)
        )


def test_capture_output_path_with_fused_attention_is_the_fused_processor(tiny_pipe):
    prompts = ["a photograph of a dog", "a long shot of a potted plant"]
    plain = run(tiny_pipe, prompts, output_type="latent").images
    everywhere = {key: FusedThroughCaptureOutput() for key in tiny_pipe.unet.attn_processors}
    with installed_processors(tiny_pipe.unet, everywhere):
        rebuilt = run(tiny_pipe, prompts, output_type="latent").images
    assert torch.equal(rebuilt, plain)


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["cfg", "no-guidance"])
def test_captured_sums_equal_naive_reference(tiny_pipe, guidance):
    prompts = ["a photograph of a dog", "a long shot of a potted plant"]
    positions = [[18], [17, 18, 19, 20]]  # differ per sample; several sub-tokens for the second
    # 64-row fine layer: 4 chunks
    _, capture = captured_run(tiny_pipe, prompts, positions, steps=3, guidance=guidance, query_chunk=16)
    got = capture.result()
    assert got.calls == 3

    layers = list(capture.plan.cross) + list(capture.plan.self_attn)
    reference = {l.key: RecordingAttnProcessor(len(prompts)) for l in layers}
    with installed_processors(tiny_pipe.unet, dict(reference)):
        run(tiny_pipe, prompts, steps=3, guidance=guidance, output_type="latent")

    for maps, layer in zip(got.self_attn, capture.plan.self_attn):
        torch.testing.assert_close(maps, reference[layer.key].average(), rtol=1e-4, atol=1e-5)
    side = 2
    for i, cols in enumerate(positions):
        expected = torch.cat([reference[l.key].average()[i][:, cols].T for l in capture.plan.cross])
        torch.testing.assert_close(got.cross[i], expected.view(-1, side, side), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_sd2_pipe"])
def test_fused_path_gives_the_explicit_paths_maps_and_outputs(request, pipe_name):
    """The path production runs on CUDA (fused SDPA for the layer output, the Triton kernel for the head-summed
    probabilities), here on the CPU under Triton's interpreter (tests/conftest.py); SD2-style: upcast attention."""
    pipe = request.getfixturevalue(pipe_name)
    prompts = ["a photograph of a dog", "a long shot of a potted plant"]
    positions = [[18], [17, 18, 19, 20]]
    assert default_path(pipe.unet.device) == "explicit"
    explicit_latents, explicit = captured_run(pipe, prompts, positions, path="explicit")
    fused_latents, fused = captured_run(pipe, prompts, positions, path="fused")
    got, expected = fused.result(), explicit.result()
    for a, b in zip(got.cross, expected.cross):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for maps, alone in zip(got.self_attn, expected.self_attn):
        torch.testing.assert_close(maps, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_latents, explicit_latents, rtol=0, atol=2e-5)


# bf16 is checked on a GPU (bench/check_fused_capture.py): the interpreter computes through numpy, which has no bf16
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_kernel_matches_fp64_reference(dtype):
    torch.manual_seed(0)
    query, key = torch.randn(2, 3, 80, 16, dtype=dtype), torch.randn(2, 3, 77, 16, dtype=dtype)  # ragged tiles
    acc = torch.ones(2, 80, 77)
    add_head_summed_probabilities(query, key, 0.25, torch.tensor(0.5), acc)
    reference = torch.softmax(query.double() @ key.double().transpose(-1, -2) * 0.25, dim=-1).sum(1)
    torch.testing.assert_close(acc.double(), 1 + 0.5 * reference, rtol=0, atol=1e-6)


def test_capture_window_averages_only_chosen_calls(tiny_pipe):
    _, capture = captured_run(tiny_pipe, ["a dog"], [[5]], steps=4, window=(1, 3))
    layer = capture.plan.self_attn[-1]
    reference = RecordingAttnProcessor(1)
    with installed_processors(tiny_pipe.unet, {layer.key: reference}):
        run(tiny_pipe, ["a dog"], steps=4, output_type="latent")
    assert capture.result().calls == 2
    torch.testing.assert_close(capture.result().self_attn[-1], reference.average(slice(1, 3)), atol=1e-5, rtol=1e-4)


def test_window_past_the_last_call_is_an_error(tiny_pipe):
    _, capture = captured_run(tiny_pipe, ["a dog"], [[5]], steps=2, window=(5, 9))
    with pytest.raises(RuntimeError, match=r"capture window \(5, 9\)"):
        capture.result()


def retained_tensor_bytes(capture: SeeDiffCapture) -> int:
    """Bytes of every distinct tensor the capture's processors hold (sums, workspaces, lists, dicts)."""
    seen: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            visit(vars(value))

    for processor in capture.processors().values():
        visit(vars(processor))
    return sum(seen.values())


def test_accumulator_memory_does_not_grow_with_steps(tiny_pipe):
    sums, retained = [], []
    for steps in (2, 20):
        _, capture = captured_run(tiny_pipe, ["a dog", "a cat"], [[5], [6]], steps=steps)
        assert capture.result().calls == steps
        sums.append(capture.buffer_bytes())
        retained.append(retained_tensor_bytes(capture))
    # fp32 [B, N, N] for the three scales and [B, N, 77 text tokens] per coarse cross layer
    assert sums[0] == sums[1] == 4 * 2 * (64**2 + 16**2 + 4**2 + 3 * 4 * 77)
    # nothing else the processors keep (workspaces, per-call state) grows with the number of UNet calls either
    assert retained[0] == retained[1]


def test_batch_maps_equal_single_runs(tiny_pipe):
    prompts = ["a photograph of a dog", "cat on a sofa", "a long shot of a potted plant"]
    positions = [[18], [1, 2, 3], [17, 18, 19, 20, 21, 22]]
    _, batch = captured_run(tiny_pipe, prompts, positions)
    for i, (prompt, cols) in enumerate(zip(prompts, positions)):
        _, single = captured_run(tiny_pipe, [prompt], [cols], seed=i)
        torch.testing.assert_close(batch.result().cross[i], single.result().cross[0], rtol=1e-4, atol=1e-5)
        for maps, alone in zip(batch.result().self_attn, single.result().self_attn):
            torch.testing.assert_close(maps[i], alone[0], rtol=1e-4, atol=1e-5)


def test_processors_keep_no_python_state(tiny_pipe):
    """Every attribute of every processor is the same object after a run: only tensor contents change, so a
    compiled UNet's guards on them hold from call to call."""
    capture = SeeDiffCapture(tiny_pipe.unet, LATENT, 1)
    before = {key: dict(vars(p)) for key, p in capture.processors().items()}
    with capture.begin([[5]]):
        run(tiny_pipe, ["a dog"], steps=3, output_type="latent", callback_on_step_end=capture.step_end)
    after = {key: vars(p) for key, p in capture.processors().items()}
    assert all(after[key][name] is value for key, attrs in before.items() for name, value in attrs.items())
    assert capture.result().calls == 3


def test_one_capture_serves_successive_batches_up_to_its_size(tiny_pipe):
    """What a compiled actor does: one capture stays installed; each batch (a shard's last one smaller) begins anew."""
    prompts = ["a photograph of a dog", "cat on a sofa", "a long shot of a potted plant"]
    positions = [[18], [1, 2, 3], [17, 18, 19, 20, 21, 22]]
    fresh = [captured_run(tiny_pipe, prompts[:n], positions[:n], seed=n)[1].result() for n in (3, 1)]
    capture = SeeDiffCapture(tiny_pipe.unet, LATENT, 3)
    with capture:
        for n, expected in zip((3, 1), fresh):
            capture.begin(positions[:n])
            run(tiny_pipe, prompts[:n], seed=n, output_type="latent", callback_on_step_end=capture.step_end)
            got = capture.result()
            assert len(got.cross) == n and all(m.shape[0] == n for m in got.self_attn)
            for a, b in zip(got.cross, expected.cross):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            for maps, alone in zip(got.self_attn, expected.self_attn):
                torch.testing.assert_close(maps, alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch of 4 samples exceeds the capture's 3"):
        capture.begin(positions + [[5]])


def test_processors_restored_after_exception_in_generation(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)

    def fail(pipe, step, timestep, kwargs):
        raise RuntimeError("boom at step")

    with pytest.raises(RuntimeError, match="boom at step"):
        with SeeDiffCapture(tiny_pipe.unet, LATENT, 1).begin([[5]]):
            run(tiny_pipe, ["a dog"], callback_on_step_end=fail)
    after = tiny_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_sd2_style_unet_is_captured(tiny_sd2_pipe):
    assert {l.heads for l in locate_attention_layers(tiny_sd2_pipe.unet, LATENT)} == {2, 4}
    _, capture = captured_run(tiny_sd2_pipe, ["a dog"], [[5]])
    fine = capture.plan.self_attn[-1]
    reference = RecordingAttnProcessor(1)
    with installed_processors(tiny_sd2_pipe.unet, {fine.key: reference}):
        run(tiny_sd2_pipe, ["a dog"], output_type="latent")
    torch.testing.assert_close(capture.result().self_attn[-1], reference.average(), rtol=1e-4, atol=1e-5)
    assert capture.result().cross[0].shape == (3, 2, 2)


def test_unet_without_the_three_scales_fails_clearly():
    # diffusers' own tiny test UNet: attention at one scale only (16 x 16 of a 32 x 32 latent)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    with pytest.raises(UnsupportedUNetError, match=r"cross-attention in down/up blocks at 8x8.*self-attention #0 at depth 0"):
        SeeDiffCapture(unet, 32, 1)



# ---------------------------------------------------------------- every family, h != w, against a store-all reference


class StoreAll:
    """Naive reference for a whole UNet: RecordingAttnProcessor on every attention layer (explicit attention, every
    call kept). Picks SeeDiff's layers by its own reading of the recorded maps (block name, layer kind and query
    count), not through the capture's plan."""

    def __init__(self, unet, n_samples):
        self.recorders = {key: RecordingAttnProcessor(n_samples) for key in unet.attn_processors}

    def maps(self, kind: str, blocks: tuple[str, ...], tokens: int) -> list[tuple[str, torch.Tensor]]:
        """(key, time-averaged head-summed map) of every recorded layer of ``kind`` in ``blocks`` with ``tokens``
        queries, in forward order (block group, then index within it)."""
        attn = "attn1" if kind == "self" else "attn2"
        order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        found = [
            (key, rec) for key, rec in self.recorders.items()
            if f".{attn}." in key and key.split(".")[0] in blocks and rec.maps[0].shape[2] == tokens
        ]
        found.sort(key=lambda kr: (order[kr[0].split(".")[0]], int(kr[0].split(".")[1]) if kr[0][0] != "m" else 0))
        return [(key, rec.average()) for key, rec in found]


def pooled_keys(maps: torch.Tensor, grid: tuple[int, int], f: int) -> torch.Tensor:
    """[B, N, N] -> [B, N, N / f²]: each row's keys summed over f x f blocks of the grid, by explicit loops."""
    h, w = grid
    out = torch.zeros(maps.shape[0], maps.shape[1], (h // f) * (w // f))
    for y in range(h):
        for x in range(w):
            out[:, :, (y // f) * (w // f) + x // f] += maps[:, :, y * w + x]
    return out


FAMILY_CASES = [  # (saved model, latent (h, w), expected self grids coarse -> fine, cap on self entries, path)
    ("sd1", (8, 12), ((2, 3), (4, 6), (8, 12)), None, "explicit"),
    ("sd2-base", (16, 16), ((4, 4), (8, 8), (16, 16)), None, "explicit"),
    ("sd21-768", (24, 24), ((6, 6), (12, 12), (24, 24)), 24**2 * 12**2, "explicit"),  # fine: 2x2 key blocks
    ("sd21-768", (8, 8), ((2, 2), (4, 4), (8, 8)), 8**2 * 4**2, "fused"),  # the GPU path, pooled side included
    ("sdxl", (16, 16), ((4, 4), (8, 8)), None, "explicit"),
    ("sdxl", (24, 16), ((6, 4), (12, 8)), None, "explicit"),
]


@pytest.mark.parametrize("name,latent,grids,cap,path", FAMILY_CASES,
                         ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[4]}" for c in FAMILY_CASES])
def test_every_family_captures_what_a_store_all_reference_sees(family_pipes, name, latent, grids, cap, path):
    pipe = family_pipes[name]
    prompts = ["a photograph of a dog", "a long shot of a potted plant"]
    positions = [[18], [17, 18, 19]]
    height, width = (n * pipe.vae_scale_factor for n in latent)
    capture = SeeDiffCapture(pipe.unet, latent, len(prompts), layers=default_layers(dict(pipe.unet.config)),
                             max_self_entries=cap, path=path)
    assert capture.plan.grids == grids
    kwargs = dict(prompt=prompts, num_inference_steps=2, guidance_scale=6.0, height=height, width=width,
                  output_type="latent")
    with capture.begin(positions):
        pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)],
             callback_on_step_end=capture.step_end)
    got = capture.result()

    store = StoreAll(pipe.unet, len(prompts))
    with installed_processors(pipe.unet, dict(store.recorders)):
        pipe(**kwargs, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    coarse_tokens = grids[0][0] * grids[0][1]
    cross = store.maps("cross", ("down_blocks", "up_blocks"), coarse_tokens)
    assert [key for key, _ in cross] == [l.key for l in capture.plan.cross]
    for i, cols in enumerate(positions):
        expected = torch.cat([maps[i][:, cols].T for _, maps in cross]).view(-1, *grids[0])
        torch.testing.assert_close(got.cross[i], expected, rtol=1e-4, atol=1e-5)
    for grid, pool, maps in zip(grids, capture.plan.key_pool, got.self_attn):
        key, full = store.maps("self", ("up_blocks",), grid[0] * grid[1])[0]  # the first decoder layer there
        expected = full if pool == 1 else pooled_keys(full, grid, pool)
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    assert capture.plan.key_pool == ((1, 1, 2) if cap else (1,) * len(grids))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_capture_averages_every_unet_call_of_every_scheduler(family_pipes, scheduler):
    """Multistep and PNDM schedulers call the UNet a different number of times per step: the capture counts calls,
    whatever the scheduler (here on the v-prediction model)."""
    pipe = family_pipes["sd21-768"]
    saved = pipe.scheduler
    scheduler_class, settings = SCHEDULERS[scheduler]
    pipe.scheduler = scheduler_class.from_config(saved.config, **settings)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        capture = SeeDiffCapture(pipe.unet, (8, 8), 1, layers=default_layers(dict(pipe.unet.config)))
        with capture.begin([[5]]):
            run(pipe, ["a dog"], steps=3, callback_on_step_end=capture.step_end)
    finally:
        hook.remove()
        pipe.scheduler = saved
    assert capture.result().calls == len(calls) == (4 if scheduler == "pndm" else 3)  # PLMS repeats one timestep
