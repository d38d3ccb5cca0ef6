"""The MM-DiT capture against a naive reference: a store-all processor on every block computes the joint softmax in
float64 from its own Q and K (the block's projections, text projections of double-stream blocks, q/k norms, the
rotary embedding), keeps every call, and the captured cross and self maps of the chosen blocks (conditional rows,
pooled to each cascade side) match it within 1e-4 relative; images equal plain diffusers' within one grey level.
Also: the capture counts backbone calls right for few-step schedulers of every family, and restores the processors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from seediff.schemas.config import MaskConfig, RunConfig
from seediff.workers import models
from seediff.workers.families import resolve
from seediff.workers.batch import new_capture
from seediff.workers.generate import GENERATION, diffusion_inputs
from seediff.workers.joint_capture import JointAttentionSum, locate_joint_blocks

SIZE = dict(width=192, height=128)  # latent 24 x 16, image tokens 12 x 8, cascade sides 3x2, 6x4, 12x8


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), layer.weight.double(),
                                      None if layer.bias is None else layer.bias.double())


def _rope(x: torch.Tensor, rotary) -> torch.Tensor:
    """Flux's rotary embedding on [B, S, H, D]: each (even, odd) pair rotated by the position's angle, float64."""
    cos, sin = (t.double()[None, :, None, :] for t in rotary)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return x * cos + torch.stack([-imag, real], dim=-1).flatten(3) * sin


class StoreAll:
    """Reference processor: the block's own output (diffusers' processor), and P = softmax(Q Kᵀ / sqrt(d)) over the
    whole joint sequence in float64, [B, heads, queries, keys] in joint order, kept for every call."""

    def __init__(self, kind: str):
        self.kind, self.calls = kind, []
        self.stock = FluxAttnProcessor() if kind == "flux" else JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        heads = attn.heads

        def split(t):  # [B, S, H*D] -> [B, S, H, D]
            return t.unflatten(-1, (heads, -1))

        q, k = split(_linear(attn.to_q, hidden_states)), split(_linear(attn.to_k, hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek = split(_linear(attn.add_q_proj, encoder_hidden_states)), split(_linear(attn.add_k_proj, encoder_hidden_states))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            first = (eq, ek) if self.kind == "flux" else (q, k)
            second = (q, k) if self.kind == "flux" else (eq, ek)
            q, k = torch.cat([first[0], second[0]], 1), torch.cat([first[1], second[1]], 1)
        if image_rotary_emb is not None:
            q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / q.shape[-1] ** 0.5
        self.calls.append(torch.softmax(scores, dim=-1))
        kwargs = {"image_rotary_emb": image_rotary_emb} if self.kind == "flux" else {}
        return self.stock(attn, hidden_states, encoder_hidden_states, **kwargs)


def _config(path: str, **settings) -> RunConfig:
    settings = {**SIZE, "mask": MaskConfig(pamr_iterations=5), **settings}
    return resolve(RunConfig(model=path, steps=2, batch_size=2, **settings))[0]


def _pool(x: torch.Tensor, grid: tuple[int, int], f: int, rows: bool) -> torch.Tensor:
    """[B, h*w, K] rows averaged (``rows``) or [B, Q, h*w] keys summed over f x f blocks."""
    h, w = grid
    if rows:
        return x.reshape(x.shape[0], h // f, f, w // f, f, x.shape[-1]).mean((2, 4)).flatten(1, 2)
    return x.reshape(*x.shape[:2], h // f, f, w // f, f).sum((3, 5)).flatten(2)


@pytest.mark.parametrize("family,guidance", [("flux", 3.5), ("sd3", 4.0)])
def test_captured_maps_match_a_float64_store_all_reference_and_images_are_plain(mmdit_pipes, saved_mmdits, make_specs,
                                                                                family, guidance):
    pipe = mmdit_pipes[family]
    config = _config(saved_mmdits[family], guidance_scale=guidance)
    specs = make_specs([("dog", "a photo of a {dog} on grass"), ("cat", "a {cat} under a table")], [11, 12])
    batch = GENERATION.run(pipe, specs, config, None)
    captured, positions = batch.captured, batch.positions
    transformer = pipe.transformer
    assert transformer.attn_processors.keys() and not any(
        isinstance(p, JointAttentionSum) for p in transformer.attn_processors.values())  # restored

    plain = pipe(**diffusion_inputs(pipe, specs, config), output_type="pt").images
    assert (batch.pixels - (plain * 255).round()).abs().max() <= 1.0

    blocks = locate_joint_blocks(transformer)
    reference = {b.key: StoreAll(b.kind) for b in blocks}  # every block
    saved = dict(transformer.attn_processors)
    transformer.set_attn_processor(dict(reference))
    try:
        pipe(**diffusion_inputs(pipe, specs, config), output_type="pt")
    finally:
        transformer.set_attn_processor(saved)

    layers, guided = config.layers, models.guided(pipe, config.guidance_scale)
    grid = (SIZE["height"] // 16, SIZE["width"] // 16)
    n_image = grid[0] * grid[1]
    assert captured.calls == config.steps == len(reference[blocks[0].key].calls)

    def averaged(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image->text, image->image) of block ``index``: conditional rows, head-summed, call-averaged."""
        calls = reference[blocks[index].key].calls
        p = torch.stack(calls).mean(0)
        p = p[p.shape[0] // 2:] if guided else p
        p = p.sum(1)
        text = p.shape[-1] - n_image
        images = slice(text, None) if family == "flux" else slice(0, n_image)
        texts = slice(0, text) if family == "flux" else slice(n_image, None)
        return p[:, images, texts], p[:, images, images]

    coarse = 2 ** layers.cascade[0]
    for i, per_class in enumerate(positions):
        columns = [c for cls in per_class for c in cls]
        expected = torch.cat([averaged(b)[0][i][:, columns].T for b in layers.cross_blocks])
        expected = _pool(expected.T[None], grid, coarse, rows=True)[0].T.reshape(captured.cross[i].shape)
        assert (captured.cross[i].double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    full = averaged(layers.self_block)[1]
    assert len(captured.self_attn) == len(layers.cascade)
    for side, depth in zip(captured.self_attn, layers.cascade):
        f = 2**depth
        expected = _pool(_pool(full, grid, f, rows=True), grid, f, rows=False) if f > 1 else full
        assert side.shape == expected.shape
        assert (side.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    if family == "sd3":  # the T5 columns sit after the 77 CLIP ones in the joint text sequence
        assert all(max(cls) >= 77 and min(cls) < 77 for per_class in positions for cls in per_class)


def _count_calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("family,scheduler,steps,guidance", [
    ("flux", "default", 4, 0.0),  # Flux.1-schnell: 4 steps, no guidance
    ("sd3", "default", 2, 1.0),  # guidance 1: every row conditional
    ("sd1", "lcm", 4, 1.0),  # LCM: 4 steps
    ("sd1", "euler_a_trailing", 1, 0.0),  # SDXL-Turbo style: 1 step, no CFG
    ("sdxl", "ddim_trailing", 2, 0.0),
    ("sdxl", "euler_trailing", 3, 6.0),  # SDXL-Lightning style with guidance
])
def test_capture_counts_backbone_calls_for_few_step_schedulers(mmdit_pipes, saved_mmdits, family_pipes, saved_models,
                                                               make_specs, family, scheduler, steps, guidance):
    path = (saved_mmdits | saved_models)[family]
    config = resolve(RunConfig(model=path, resolution=128 if family in ("flux", "sd3") else 64, steps=steps,
                               guidance_scale=guidance, scheduler=scheduler, batch_size=1,
                               mask=MaskConfig(pamr_iterations=5)))[0]
    pipe = models.load_model(config, torch.device("cpu"))
    calls = _count_calls(models.backbone(pipe))
    specs = make_specs([("dog", "a photo of a {dog}")], [3])
    with new_capture(pipe, config, 1, GENERATION.guided(pipe, config)) as capture:
        assert capture.guided == (guidance > 1 and family != "flux")
        captured = GENERATION.run(pipe, specs, config, capture).captured
    assert captured.calls == calls[0] == steps


def test_key_pooled_self_sum_gives_the_same_cascade_sides(mmdit_pipes, saved_mmdits, make_specs):
    """The (2, 1) cascade keeps the grid's keys in 2x2 blocks; past mask.max_self_entries in 4x4 blocks: the grid/4
    side is the same, the grid/2 side keeps its rows with the keys summed in 2x2 blocks of that side."""
    pipe = mmdit_pipes["flux"]
    specs = make_specs([("dog", "a photo of a {dog}")], [5])
    plain = _config(saved_mmdits["flux"])
    pooled = _config(saved_mmdits["flux"], mask=MaskConfig(pamr_iterations=5, max_self_entries=96 * 96 // 16))
    assert plain.layers.cascade == (2, 1)
    a, b = (GENERATION.run(pipe, specs, c, None).captured for c in (plain, pooled))
    side = (SIZE["height"] // 32, SIZE["width"] // 32)
    assert a.self_attn[-1].shape[-2:] == (24, 24) and b.self_attn[-1].shape[-2:] == (24, 6)
    torch.testing.assert_close(b.self_attn[-1], _pool(a.self_attn[-1], side, 2, rows=False))
    torch.testing.assert_close(b.self_attn[0], a.self_attn[0])


def test_capture_processor_compiles_into_one_graph(mmdit_pipes, saved_mmdits):
    """torch.compile(fullgraph=True) of a captured Flux double-stream attention: no graph break, the same output and
    sums as eager (compiling a whole transformer takes minutes on the CPU; each block kind runs the same code)."""
    pipe = mmdit_pipes["flux"]
    config = _config(saved_mmdits["flux"], resolution=64, width=None, height=None)
    capture = new_capture(pipe, config, 1, GENERATION.guided(pipe, config))
    block = pipe.transformer.transformer_blocks[config.layers.self_block]
    processor = capture.processors()[f"transformer_blocks.{config.layers.self_block}.attn.processor"]
    grid = processor.grid
    torch.manual_seed(0)
    image, text = torch.randn(1, grid[0] * grid[1], 32), torch.randn(1, 512, 32)
    rotary = pipe.transformer.pos_embed(torch.zeros(512 + grid[0] * grid[1], 3))
    capture.begin([[1]])

    def run(fn):
        for t in processor.sums():
            t.zero_()
        return fn(block.attn, image, text, image_rotary_emb=rotary), [t.clone() for t in processor.sums()]

    (eager, eager_text), eager_sums = run(processor)
    (compiled, compiled_text), compiled_sums = run(torch.compile(processor, fullgraph=True, dynamic=False))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_text, eager_text, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_sums, eager_sums):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(t.abs().sum() > 0 for t in compiled_sums)
