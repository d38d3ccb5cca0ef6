"""Capture SeeDiff's maps from an MM-DiT's joint attention (Flux.1, SD3/3.5), behind the same ``CapturedAttention``
as the UNet capture, so ``label_maps`` takes them unchanged.

In an MM-DiT every block attends over one joint sequence [text tokens, image tokens] (Flux: text first; SD3: image
first). For a chosen block, with Q and K exactly as its processor forms them (its q/k norms, the text projections
of double-stream blocks, the rotary embedding), P = softmax(Q Kᵀ · scale) over the block's whole joint key
sequence, summed over heads, at the image-query rows:

- the **cross map** of text token t is P at key column t (not renormalised), time-averaged;
- the **self map** is P at the image-key columns (image x image), time-averaged.

The image-token grid is one side, so the cascade's sides are pooled from it: at depth k (grid / 2^k), query rows
averaged over 2^k x 2^k blocks and key columns summed over the same blocks (linear, so it commutes with the time
average; the cross sums are kept pooled to the seed side, the self sum with its keys pooled to the finest side). Only the chosen blocks run a capture processor; the others keep diffusers' own. A processor is stateless
(the step weight is a 0-d tensor set between calls), adds the conditional rows only to preallocated fp32 running
sums, and computes the block's output exactly as diffusers' processor does (the same fused attention), so images
do not change. Knows nothing of masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from seediff.schemas.config import LayerChoice, RunConfig
from seediff.workers import families, models
from seediff.workers.seediff import pool_cross, pool_self
from seediff.workers.capture import (
    CapturedAttention,
    WeightedCapture,
    _accumulate,
    _conditional_half,
    _probabilities,
)


@dataclass(frozen=True)
class JointBlock:
    key: str  # processor key, as in transformer.attn_processors
    index: int  # position in forward order (Flux: double-stream blocks, then single-stream ones)
    kind: str  # "flux" (text first, RoPE; double- or single-stream) or "sd3" (image first)
    heads: int


def locate_joint_blocks(transformer: torch.nn.Module) -> list[JointBlock]:
    """The joint-attention modules of the transformer's blocks, in forward order."""
    kind = "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"
    groups = ["transformer_blocks", "single_transformer_blocks"] if kind == "flux" else ["transformer_blocks"]
    found = []
    for group in groups:
        for i, block in enumerate(getattr(transformer, group)):
            found.append(JointBlock(f"{group}.{i}.attn.processor", len(found), kind, block.attn.heads))
    return found


def power_of_two_pool(grid: tuple[int, int], max_entries: int | None) -> int:
    """The smallest power of 2 dividing both sides of ``grid`` whose f x f key blocks bring queries x keys within
    ``max_entries`` (the largest such power when none does; 1 without a cap). Powers of 2 keep every pooled cascade
    side a whole number of key blocks."""
    tokens, f = grid[0] * grid[1], 1
    while max_entries is not None and tokens * tokens // (f * f) > max_entries and all(n % (2 * f) == 0 for n in grid):
        f *= 2
    return f


class JointAttentionSum:
    """What the capture processors of MM-DiT blocks share. Stateless: a processor returns its block's normal output
    and adds ``weight`` times the head-summed joint probabilities of the conditional samples' image-query rows to
    ``cross`` [max_samples, seed-side cells, text tokens] (query rows averaged in ``cross_pool`` x ``cross_pool``
    blocks) and / or ``self_sum`` [max_samples, image tokens, image
    tokens / f²] (keys summed in f x f blocks, ``key_pool``), in blocks of ``query_chunk`` image rows, in fp32."""

    _attention_backend = None  # set by the transformer's set_attention_backend, as on diffusers' own processors
    _parallel_config = None

    def __init__(
        self, block: JointBlock, grid: tuple[int, int], text_tokens: int, max_samples: int, guided: bool,
        weight: torch.Tensor, query_chunk: int, cross: bool, self_attn: bool, key_pool: int = 1, cross_pool: int = 1,
    ):
        self.block, self.grid, self.text_tokens = block, grid, text_tokens
        self.guided, self.weight, self.key_pool, self.cross_pool = guided, weight, key_pool, cross_pool
        n_image = grid[0] * grid[1]
        # whole bands of cross_pool grid rows per block of query rows, so each block pools on its own
        band = cross_pool * grid[1]
        self.query_chunk = min(max(1, query_chunk // band) * band, n_image)
        device = weight.device
        self.cross = (torch.zeros(max_samples, n_image // cross_pool**2, text_tokens, device=device) if cross
                      else None)
        self.self_sum = torch.zeros(max_samples, n_image, n_image // key_pool**2, device=device) if self_attn else None

    def sums(self) -> list[torch.Tensor]:
        return [t for t in (self.cross, self.self_sum) if t is not None]

    def _capture(self, query: torch.Tensor, key: torch.Tensor, image_from: int, text: slice) -> None:
        """Add the probabilities of the conditional samples' image-query rows ([B, heads, joint, head_dim] queries and
        keys, image tokens at ``image_from``, text keys at ``text``) to the sums."""
        cond = _conditional_half(query.shape[0], self.guided)
        n_image = self.grid[0] * self.grid[1]
        images = slice(image_from, image_from + n_image)
        q, k = query[cond, :, images], key[cond]
        n = q.shape[0]
        if n > self.sums()[0].shape[0]:
            raise ValueError(f"a batch of {n} samples exceeds the capture's {self.sums()[0].shape[0]}")
        if self.cross is not None and k[:, :, text].shape[2] != self.text_tokens:
            raise ValueError(f"block {self.block.index} sees {k[:, :, text].shape[2]} text tokens, the capture was "
                             f"built for {self.text_tokens} (the pipeline's max_sequence_length)")
        for rows, probs in _probabilities(q, k, query.shape[-1] ** -0.5, self.query_chunk):
            if self.cross is not None:
                self._add_cross(self.cross[:n], rows, probs[..., text])
            if self.self_sum is not None:
                _accumulate(self.self_sum[:n], rows, probs[..., images], self.weight, self.grid, self.key_pool)


    def _add_cross(self, sums: torch.Tensor, rows: slice, probs: torch.Tensor) -> None:
        """``sums += weight · Σ_heads probs`` with the query rows averaged in cross_pool x cross_pool blocks of the
        grid (the seed side: linear, so the time average commutes with it); ``rows`` is whole bands of the grid."""
        n, _, count, keys = probs.shape
        f, width = self.cross_pool, self.grid[1]
        pooled = probs.sum(1).reshape(n, count // (f * width), f, width // f, f, keys).mean((2, 4)).flatten(1, 2)
        start = rows.start // (f * f)
        sums[:, start:start + pooled.shape[1]].add_(self.weight * pooled)


class FluxAttentionSum(JointAttentionSum):
    """A Flux.1 block's (``FluxAttention``) capture processor: FluxAttnProcessor's computation (double-stream: the
    text states projected apart and put first; single-stream: the joint states come in), capturing before the
    attention product, which stays diffusers' dispatched (fused) attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("capturing a block called with an attention mask is not supported")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value)
            )
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = query.shape[1] - self.grid[0] * self.grid[1]
        self._capture(query.transpose(1, 2), key.transpose(1, 2), image_from=text, text=slice(0, text))
        out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())



class SD3AttentionSum(JointAttentionSum):
    """An SD3/3.5 joint block's capture processor: JointAttnProcessor2_0's computation (image states first, then the
    projected text states), capturing before the attention product, which stays fused SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if attention_mask is not None:
            raise NotImplementedError("capturing a block called with an attention mask is not supported")
        batch, n_image = hidden_states.shape[:2]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context = [split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states)),
                       split(attn.add_v_proj(encoder_hidden_states))]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (torch.cat([a, b], dim=2) for a, b in zip((query, key, value), context))
        self._capture(query, key, image_from=0, text=slice(n_image, None))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)
        encoder_out = None
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_out is None else (out, encoder_out)


_PROCESSORS = {"flux": FluxAttentionSum, "sd3": SD3AttentionSum}


class JointCapture(WeightedCapture):
    """Capture processors on the blocks ``layers`` names (``cross_blocks``, ``self_block``, ``cascade`` depths below
    the image-token ``grid``) of an MM-DiT ``transformer`` for batches of up to ``max_samples`` samples; the
    per-batch protocol is ``WeightedCapture``'s. ``token_positions[i]`` are sample i's class columns in the joint
    text sequence (``text_tokens`` long). ``max_self_entries`` caps queries x keys of the self sum (keys summed in
    f x f blocks past it)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        grid: tuple[int, int],
        max_samples: int,
        *,
        layers: LayerChoice,
        text_tokens: int,
        guided: bool = False,
        query_chunk: int = 1024,
        max_self_entries: int | None = None,
    ):
        super().__init__(transformer, max_samples, guided)
        blocks = locate_joint_blocks(transformer)
        wanted = {*layers.cross_blocks, layers.self_block}
        if missing := sorted(b for b in wanted if not 0 <= b < len(blocks)):
            raise ValueError(f"the transformer has blocks 0-{len(blocks) - 1}, not {missing}")
        cell = 2 ** max(layers.cascade)
        if grid[0] % cell or grid[1] % cell:
            raise ValueError(f"image-token grid {grid} is not a whole number of {cell}x{cell} cells (cascade "
                             f"{layers.cascade})")
        self.grid, self.layers = tuple(grid), layers
        # Keys summed in blocks as coarse as the finest cascade side's (its rows are pooled at result()), or coarser
        # past max_self_entries: the (2, 1) default keeps a quarter of the grid's keys.
        self.key_pool = max(power_of_two_pool(self.grid, max_self_entries), 2 ** min(layers.cascade))
        self.blocks = {
            b: _PROCESSORS[blocks[b].kind](blocks[b], self.grid, text_tokens, max_samples, guided, self.weight, query_chunk,
                                 cross=b in layers.cross_blocks, self_attn=b == layers.self_block,
                                 key_pool=self.key_pool, cross_pool=2 ** layers.cascade[0])
            for b in sorted(wanted)
        }

    def processors(self) -> dict[str, JointAttentionSum]:
        return {p.block.key: p for p in self.blocks.values()}

    def sums(self) -> list[torch.Tensor]:
        return [t for p in self.blocks.values() for t in p.sums()]

    def result(self) -> CapturedAttention:
        """The time-averaged maps of the batch begun last: cross per sample [n_blocks x n_tokens, h, w] at the coarse
        side (block-major), self per cascade side, coarse first."""
        total, calls = self._total()
        n = len(self.token_positions)
        coarse = 2 ** self.layers.cascade[0]
        seed_grid = (self.grid[0] // coarse, self.grid[1] // coarse)
        cross = [
            torch.cat([self.blocks[b].cross[i][:, columns].T for b in self.layers.cross_blocks]).view(-1, *seed_grid)
            / total
            for i, columns in enumerate(self.token_positions)
        ]
        full = self.blocks[self.layers.self_block].self_sum[:n] / total
        sides = tuple(self._side(full, 2**depth) for depth in self.layers.cascade)
        return CapturedAttention(cross=cross, self_attn=sides, calls=calls)

    def _side(self, full: torch.Tensor, f: int) -> torch.Tensor:
        """The cascade side grid / f of the self map captured at the grid (``pool_self``); where the capture's key
        pool is coarser than f (a grid past ``max_self_entries``), only the query rows are averaged."""
        if f % self.key_pool == 0:
            return pool_self(full, self.grid, f)
        keys = full.shape[-1]
        rows = pool_cross(full.transpose(1, 2).reshape(len(full), keys, *self.grid), f)
        return rows.flatten(2).transpose(1, 2)


def new_joint_capture(pipe, config: RunConfig, max_samples: int, guided: bool) -> JointCapture:
    """The capture for ``pipe``'s transformer under ``config``: the blocks of ``config.layers``, the family's where it
    leaves them unset; the text sequence of the family's row. ``guided``: the transformer sees [unconditional,
    conditional] batches (``workers/batch.BatchImages.guided``)."""
    found = models.family_of(pipe)
    transformer = pipe.transformer
    width, height = config.size
    patch = families.patch_size(found.name, dict(transformer.config))
    grid = (height // pipe.vae_scale_factor // patch, width // pipe.vae_scale_factor // patch)
    return JointCapture(
        transformer, grid, max_samples,
        layers=families.choose_joint_layers(found.name, dict(transformer.config), config.layers),
        text_tokens=found.text_tokens,
        guided=guided,
        query_chunk=config.mask.query_chunk,
        max_self_entries=config.mask.max_self_entries,
    )
