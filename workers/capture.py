"""Capture the few attention maps SeeDiff reads, through diffusers' attention-processor API.

Locate every attention layer from the UNet's module structure, choose SeeDiff's layers (every cross-attention layer at
latent/4 and the first decoder self-attention at latent/4, latent/2 and latent), install capture processors on those
layers only, and restore the previous processors on exit. A capture processor returns the layer's normal output and,
for the conditional half only, adds the head-summed softmax probabilities to a preallocated fp32 running sum. On CUDA
the whole batch keeps fused SDPA and a fused kernel adds the probabilities; elsewhere the conditional half's output is
computed from the explicit probabilities, so no attention product is computed twice. Knows nothing of masks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

try:  # the fused kernel needs Triton (CUDA builds of torch ship it); elsewhere the chunked torch path runs
    from seediff.workers.attention_kernels import add_head_summed_probabilities
except ImportError:
    add_head_summed_probabilities = None

SCALE_DEPTHS = {"fine": 0, "middle": 1, "coarse": 2}  # SeeDiff's scales as downsampling depth below the latent
_BLOCK_RANK = {"down": 0, "mid": 1, "up": 2}  # forward order of the UNet's block groups
# Off the GPU, explicit attention is memory-bound: a [B, heads, rows, keys] block that fits in cache is several times
# faster per row than one that does not (2-core dev machine: 4 MiB blocks ran 3.7x faster than 16 MiB ones).
CPU_BLOCK_BYTES = 4 * 2**20


class UnsupportedUNetError(ValueError):
    """The UNet lacks attention layers SeeDiff reads; the message names them."""


@dataclass(frozen=True)
class AttentionLayer:
    key: str  # processor key, as in unet.attn_processors
    kind: str  # "self" (attn1) or "cross" (attn2)
    block: str  # "down" | "mid" | "up"
    block_index: int
    order: int  # position in the UNet's forward order
    side: int  # spatial side of the layer's query grid
    heads: int


@dataclass(frozen=True)
class CapturePlan:
    cross: tuple[AttentionLayer, ...]  # every cross-attention layer at the coarse scale (down and up blocks)
    self_attn: dict[str, AttentionLayer]  # scale name -> first up-block self-attention layer at that scale


@dataclass
class CapturedAttention:
    cross: list[torch.Tensor]  # per sample [n_layers * n_subtokens, s, s], layer-major, time-averaged, head-summed
    self_attn: dict[str, torch.Tensor]  # scale name -> [B, N, N], rows = queries, time-averaged, head-summed
    calls: int  # UNet calls averaged into the maps


def locate_attention_layers(unet: torch.nn.Module, latent_size: int) -> list[AttentionLayer]:
    """Every Attention module of the UNet's down, mid and up blocks, in forward order. The side comes from the
    block's downsampling depth (stride-2 convs give ceil(n / 2)), not from module names."""
    depth_of = _block_depths(unet)
    found = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        block, index = _block_of(name)
        if block is None:
            continue
        kind = {"attn1": "self", "attn2": "cross"}.get(name.rsplit(".", 1)[-1])
        if kind is None:
            continue
        found.append((name, kind, block, index, module.heads))
    found.sort(key=lambda f: (_BLOCK_RANK[f[2]], f[3]))  # stable: module order within a block is forward order
    return [
        AttentionLayer(
            f"{name}.processor", kind, block, index, order, _side_at_depth(latent_size, depth_of[(block, index)]), heads
        )
        for order, (name, kind, block, index, heads) in enumerate(found)
    ]


def plan_seediff_layers(layers: Sequence[AttentionLayer], latent_size: int) -> CapturePlan:
    sides = {scale: _side_at_depth(latent_size, depth) for scale, depth in SCALE_DEPTHS.items()}
    cross = tuple(l for l in layers if l.kind == "cross" and l.block != "mid" and l.side == sides["coarse"])
    self_attn = {}
    for scale, side in sides.items():
        first = next((l for l in layers if l.kind == "self" and l.block == "up" and l.side == side), None)
        if first is not None:
            self_attn[scale] = first
    missing = [f"up-block self-attention at {s} ({sides[s]}x{sides[s]})" for s in sides if s not in self_attn]
    if not cross:
        missing.insert(0, f"cross-attention at coarse ({sides['coarse']}x{sides['coarse']})")
    if missing:
        present = sorted({(l.kind, l.block, l.side) for l in layers})
        raise UnsupportedUNetError(
            f"UNet lacks attention SeeDiff reads at latent {latent_size}: missing {', '.join(missing)}; "
            f"it has (kind, block, side) {present}"
        )
    return CapturePlan(cross, self_attn)


class _ConditionalCapture:
    """Base capture processor: the layer's normal output, plus head-summed probabilities of the conditional half
    (the second half under classifier-free guidance, else the whole batch) added to ``sum`` for UNet calls inside
    ``window``. Outside the window, fused SDPA for the whole batch."""

    def __init__(self, n_samples: int, window: tuple[int, int] | None, query_chunk: int):
        self.n_samples = n_samples
        self.window = window
        self.query_chunk = query_chunk
        self.fused = AttnProcessor2_0()
        self.workspace = _Workspace()
        self.calls = 0  # UNet calls seen (one per call: each layer runs once per UNet forward)
        self.captured = 0  # calls added to the sum

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        capturing = self.window is None or self.window[0] <= self.calls < self.window[1]
        self.calls += 1
        if not capturing:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None:
            raise NotImplementedError("capturing a layer called with an attention mask is not supported")
        self.captured += 1
        return _attention_output(attn, hidden_states, encoder_hidden_states, temb, self._attend)

    def _attend(self, attn: Attention, query, key, value) -> torch.Tensor:
        """The attention product of a captured call; the capture reuses the layer's own Q, K (and V) projections.
        GPU: fused SDPA for the whole batch, and ``add`` (the fused kernel for self layers) on the conditional half.
        Elsewhere: fused SDPA on the unconditional half only; the conditional half's output comes from the explicit
        probabilities the capture needs anyway (probs @ V per query block), so no Q Kᵀ is computed twice."""
        cond = _conditional_half(query.shape[0], self.n_samples)
        if query.is_cuda:
            out = F.scaled_dot_product_attention(query, key, value)
            self.add(attn, query[cond], key[cond])
            return out
        out = torch.empty_like(query[cond])
        for rows, probs in _probabilities(attn, query[cond], key[cond], self.query_chunk, self.workspace):
            out[:, :, rows] = probs.to(value.dtype) @ value[cond]
            head_sum = self.workspace.get("head_sum", _drop(probs.shape, 1), probs.dtype, probs.device)
            self.add_rows(rows, torch.sum(probs, dim=1, out=head_sum))
        if cond.start is None:
            return out
        uncond = slice(None, cond.start)
        return torch.cat([F.scaled_dot_product_attention(query[uncond], key[uncond], value[uncond]), out])

    def add(self, attn: Attention, query: torch.Tensor, key: torch.Tensor) -> None:
        for rows, probs in _probabilities(attn, query, key, self.query_chunk, self.workspace):
            self.add_rows(rows, probs.sum(dim=1))

    def add_rows(self, rows: slice, probs: torch.Tensor) -> None:
        """Add head-summed probabilities [B, rows, n_keys] of query rows ``rows`` to the running sum."""
        raise NotImplementedError

    def average(self) -> torch.Tensor:
        return self.sum / self.captured


class SelfAttentionSum(_ConditionalCapture):
    """Running sum of the full head-summed self-attention matrix, [B, N, N]."""

    def __init__(self, layer: AttentionLayer, n_samples, window, query_chunk, device):
        super().__init__(n_samples, window, query_chunk)
        n = layer.side**2
        self.sum = torch.zeros(n_samples, n, n, dtype=torch.float32, device=device)

    def add(self, attn, query, key):
        if query.is_cuda and add_head_summed_probabilities is not None and not attn.upcast_attention:
            add_head_summed_probabilities(query, key, attn.scale, self.sum)
        else:
            super().add(attn, query, key)

    def add_rows(self, rows, probs):
        self.sum[:, rows].add_(probs)


class CrossTokenSum(_ConditionalCapture):
    """Running sum of the class sub-token columns of head-summed cross-attention, [B, T_max, N]; each sample's
    token positions are padded to T_max by repeating its first one (the padding is dropped in ``per_sample``)."""

    def __init__(self, layer: AttentionLayer, token_positions: Sequence[Sequence[int]], window, query_chunk, device):
        super().__init__(len(token_positions), window, query_chunk)
        self.counts = [len(p) for p in token_positions]
        width = max(self.counts)
        padded = [list(p) + [p[0]] * (width - len(p)) for p in token_positions]
        self.columns = torch.tensor(padded, dtype=torch.long, device=device)  # [B, T_max]
        self.sum = torch.zeros(len(padded), width, layer.side**2, dtype=torch.float32, device=device)

    def add_rows(self, rows, probs):
        # 77 keys: the transient is small, and only class columns are kept, so plain torch ops suffice (also on CUDA)
        index = self.columns[:, None, :].expand(-1, probs.shape[1], -1)
        self.sum[:, :, rows].add_(probs.gather(2, index).transpose(1, 2))

    def per_sample(self) -> list[torch.Tensor]:
        average = self.average()
        return [average[i, : self.counts[i]] for i in range(len(self.counts))]


class SeeDiffCapture:
    """Context manager: installs capture processors on the planned layers of ``unet`` for one batch of
    ``len(token_positions)`` samples and restores the previous processors on exit (also on exceptions).
    ``token_positions[i]`` are sample i's class sub-token positions in its tokenized prompt."""

    def __init__(
        self,
        unet: torch.nn.Module,
        latent_size: int,
        token_positions: Sequence[Sequence[int]],
        window: tuple[int, int] | None = None,
        query_chunk: int = 1024,
    ):
        if not token_positions or any(len(p) == 0 for p in token_positions):
            raise ValueError("every sample needs at least one class token position")
        self.unet = unet
        self.latent_size = latent_size
        self.plan = plan_seediff_layers(locate_attention_layers(unet, latent_size), latent_size)
        device = unet.device
        self.cross = [CrossTokenSum(l, token_positions, window, query_chunk, device) for l in self.plan.cross]
        self.self_attn = {
            scale: SelfAttentionSum(l, len(token_positions), window, query_chunk, device)
            for scale, l in self.plan.self_attn.items()
        }
        self._restore = ExitStack()

    def processors(self) -> dict[str, _ConditionalCapture]:
        out = {l.key: p for l, p in zip(self.plan.cross, self.cross)}
        out.update({self.plan.self_attn[s].key: p for s, p in self.self_attn.items()})
        return out

    def buffer_bytes(self) -> int:
        return sum(p.sum.numel() * p.sum.element_size() for p in self.processors().values())

    def __enter__(self) -> "SeeDiffCapture":
        self._restore.enter_context(installed_processors(self.unet, self.processors()))
        return self

    def __exit__(self, *exc) -> None:
        self._restore.close()

    def result(self) -> CapturedAttention:
        processors = list(self.processors().values())
        captured = {p.captured for p in processors}
        if captured != {processors[0].captured} or not processors[0].captured:
            raise RuntimeError(
                f"capture window {processors[0].window} averaged {sorted(captured)} UNet calls "
                f"of {processors[0].calls} run; it must cover at least one call"
            )
        side = _side_at_depth(self.latent_size, SCALE_DEPTHS["coarse"])
        per_layer = [p.per_sample() for p in self.cross]  # [layer][sample] -> [T_i, N]
        cross = [torch.cat([layer[i] for layer in per_layer]).view(-1, side, side) for i in range(len(per_layer[0]))]
        return CapturedAttention(
            cross=cross,
            self_attn={scale: p.average() for scale, p in self.self_attn.items()},
            calls=processors[0].captured,
        )


@contextmanager
def installed_processors(unet: torch.nn.Module, processors: dict) -> Iterator[None]:
    """Set ``processors`` on their layers (all others keep theirs) and restore the saved set on exit.
    set_attn_processor consumes the dict it gets, so each call gets a fresh copy."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({**saved, **processors})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))


def _block_depths(unet: torch.nn.Module) -> dict[tuple[str, int], int]:
    """Downsampling depth of every down, mid and up block: down blocks run before their downsampler, up blocks
    before their upsampler."""
    depths, depth = {}, 0
    for i, block in enumerate(unet.down_blocks):
        depths[("down", i)] = depth
        depth += getattr(block, "downsamplers", None) is not None
    if unet.mid_block is not None:
        depths[("mid", 0)] = depth
    for i, block in enumerate(unet.up_blocks):
        depths[("up", i)] = depth
        depth -= getattr(block, "upsamplers", None) is not None
    return depths


def _block_of(module_name: str) -> tuple[str | None, int]:
    parts = module_name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return parts[0].split("_")[0], int(parts[1])
    if parts[0] == "mid_block":
        return "mid", 0
    return None, 0


def _side_at_depth(latent_size: int, depth: int) -> int:
    side = latent_size
    for _ in range(depth):
        side = math.ceil(side / 2)
    return side


def _conditional_half(batch: int, n_samples: int) -> slice:
    """diffusers stacks [unconditional, conditional] under classifier-free guidance."""
    if batch == 2 * n_samples:
        return slice(n_samples, None)
    if batch == n_samples:
        return slice(None)
    raise ValueError(f"attention batch {batch} is neither {n_samples} samples nor {2 * n_samples} with guidance")


def _attention_output(attn: Attention, hidden_states, encoder_hidden_states, temb, attend) -> torch.Tensor:
    """AttnProcessor2_0's computation without an attention mask, with the attention product itself delegated to
    ``attend(attn, query, key, value) -> [B, heads, L, head_dim]``."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
    out = attend(attn, query, key, value)
    out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _projections(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """Queries, keys and values [B, heads, L, head_dim] of [B, L, C] states, exactly as the fused processor forms
    them."""
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _probabilities(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, chunk: int, workspace: "_Workspace"
) -> Iterator[tuple[slice, torch.Tensor]]:
    """softmax(Q Kᵀ · scale) per head in fp32, one block of query rows at a time so the transient stays
    [B, heads, rows, n_keys]. Off the GPU the block is also kept within CPU_BLOCK_BYTES, and scores and
    probabilities go into ``workspace`` buffers (valid until the next block)."""
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    key_t = key.transpose(-1, -2)
    if query.is_cuda:  # the caching allocator recycles the transients
        for start in range(0, query.shape[2], chunk):
            rows = slice(start, start + chunk)
            scores = (query[:, :, rows] * attn.scale) @ key_t
            yield rows, torch.softmax(scores, dim=-1, dtype=torch.float32)
        return
    row_bytes = query.shape[0] * query.shape[1] * key.shape[2] * 4
    chunk = max(1, min(chunk, CPU_BLOCK_BYTES // row_bytes))
    for start in range(0, query.shape[2], chunk):
        rows = slice(start, start + chunk)
        block = query[:, :, rows] * attn.scale
        shape = (*block.shape[:3], key.shape[2])
        scores = torch.matmul(block, key_t, out=workspace.get("scores", shape, block.dtype, block.device))
        yield rows, torch.softmax(scores, dim=-1, dtype=torch.float32, out=workspace.get("probs", shape, torch.float32, block.device))


class _Workspace:
    """Reused CPU buffers for the per-block transients. Fresh multi-MiB tensors every block are returned to the OS
    and page-faulted back in by glibc malloc: 140k faults per 30-step batch on the 2-core dev machine, most of the
    capture overhead."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape``; its contents are whatever the last user left."""
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)


def _drop(shape: Sequence[int], dim: int) -> tuple[int, ...]:
    return tuple(n for i, n in enumerate(shape) if i != dim)
