"""Capture the few attention maps SeeDiff reads, through diffusers' attention-processor API.

Locate every attention layer from the UNet's module structure, choose SeeDiff's layers (a ``LayerChoice``, from the
model's family: SD 1.x/2.x read every down/up cross-attention layer at latent/4 and the first decoder self-attention at
latent/4, latent/2 and latent; grids may be h x w), install capture processors on those layers only, and restore the previous processors on exit. A capture processor returns the layer's normal output and,
for the conditional half only, adds the head-summed softmax probabilities, times a per-call weight tensor set
between UNet calls, to a preallocated fp32 running sum: it keeps no Python state, so a compiled UNet traces it into
one graph. Two paths compute it: "fused" (fused SDPA for the whole batch, a Triton kernel adds the probabilities;
CUDA, or the CPU under Triton's interpreter) and "explicit" (the conditional half's output computed from the
explicit probabilities, so no attention product is computed twice). Knows nothing of masks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from seediff.schemas.config import LayerChoice

try:  # the fused path needs Triton (CUDA builds of torch ship it; on the CPU it runs under TRITON_INTERPRET=1)
    from seediff.workers.attention_kernels import add_head_summed_probabilities
except ImportError:
    add_head_summed_probabilities = None

CAPTURE_PATHS = ("fused", "explicit")
_BLOCK_RANK = {"down": 0, "mid": 1, "up": 2}  # forward order of the UNet's block groups
# SeeDiff's recipe (the official code's layers): seeds at latent/4 from down and up cross-attention, expansion by the
# first decoder self-attention at latent/4, latent/2 and latent. Model families choose theirs (workers/families.py).
SD_LAYERS = LayerChoice(cascade=(2, 1, 0))
# Off the GPU, explicit attention is memory-bound: a [B, heads, rows, keys] block that fits in cache is several times
# faster per row than one that does not (bench/RESULTS.md has the measurement).
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
    grid: tuple[int, int]  # (height, width) of the layer's query grid
    heads: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class CapturePlan:
    cross: tuple[AttentionLayer, ...]  # every cross-attention layer at the coarse side in the seed blocks
    self_attn: tuple[AttentionLayer, ...]  # one decoder self-attention layer per cascade side, coarse first
    key_pool: tuple[int, ...]  # per cascade side: keys summed in f x f blocks (1 = every key kept)

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        return tuple(l.grid for l in self.self_attn)


@dataclass
class CapturedAttention:
    cross: list[torch.Tensor]  # per sample [n_layers * n_subtokens, h, w], layer-major, time-averaged, head-summed
    self_attn: tuple[torch.Tensor, ...]  # per cascade side, coarse first: [B, h*w, keys], rows = queries
    calls: int  # UNet calls averaged into the maps


def locate_attention_layers(unet: torch.nn.Module, latent_size: int | tuple[int, int]) -> list[AttentionLayer]:
    """Every Attention module of the UNet's down, mid and up blocks, in forward order. ``latent_size``: side, or
    (height, width). The grid comes from the block's downsampling depth (stride-2 convs give ceil(n / 2)), not from
    module names."""
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
            f"{name}.processor", kind, block, index, order, grid_at_depth(latent_size, depth_of[(block, index)]), heads
        )
        for order, (name, kind, block, index, heads) in enumerate(found)
    ]


def plan_seediff_layers(
    layers: Sequence[AttentionLayer],
    latent_size: int | tuple[int, int],
    choice: LayerChoice = SD_LAYERS,
    max_self_entries: int | None = None,
) -> CapturePlan:
    """The layers ``choice`` names, at this latent size. ``max_self_entries`` caps queries x keys of each self
    sum: a larger side keeps its keys summed in f x f blocks (``key_pool``), the smallest f dividing the side."""
    grids = [grid_at_depth(latent_size, depth) for depth in choice.cascade]
    coarse = grids[0]
    cross = tuple(l for l in layers if l.kind == "cross" and l.block in choice.seed_blocks and l.grid == coarse)
    self_attn, missing = [], []
    for depth, grid in zip(choice.cascade, grids):
        decoder = [l for l in layers if l.kind == "self" and l.block == "up" and l.grid == grid]
        if len(decoder) > choice.expand_layer:
            self_attn.append(decoder[choice.expand_layer])
        else:
            missing.append(f"decoder self-attention #{choice.expand_layer} at depth {depth} ({grid[0]}x{grid[1]})")
    if not cross:
        missing.insert(0, f"cross-attention in {'/'.join(choice.seed_blocks)} blocks at {coarse[0]}x{coarse[1]}")
    if missing:
        present = sorted({(l.kind, l.block, l.grid) for l in layers})
        raise UnsupportedUNetError(
            f"UNet lacks attention SeeDiff reads at latent {latent_size}: missing {', '.join(missing)}; "
            f"it has (kind, block, grid) {present}"
        )
    pools = tuple(key_pool(l.grid, max_self_entries) for l in self_attn)
    return CapturePlan(cross, tuple(self_attn), pools)


def key_pool(grid: tuple[int, int], max_entries: int | None) -> int:
    """The smallest f dividing both sides of ``grid`` whose f x f key blocks bring queries x keys within
    ``max_entries`` (the largest common divisor when none does; 1 without a cap)."""
    if max_entries is None:
        return 1
    tokens = grid[0] * grid[1]
    divisors = [f for f in range(1, math.gcd(*grid) + 1) if grid[0] % f == 0 and grid[1] % f == 0]
    return next((f for f in divisors if tokens * (tokens // f**2) <= max_entries), divisors[-1])


class AttentionSum:
    """Capture processor of one layer, stateless: returns the layer's normal output and adds ``weight`` times the
    head-summed softmax probabilities of the conditional half (the second half under classifier-free guidance, else
    the whole batch) to the preallocated fp32 running sum ``sum`` [max_samples, queries, keys]. ``weight`` is a 0-d
    tensor shared by the processors of a capture and set between UNet calls (``SeeDiffCapture.step_end``): a captured
    layer runs the same tensor program on every call and changes no Python state, so torch.compile traces it into
    the UNet's graph without breaks and CUDA graphs can replay it.

    ``path`` "fused": fused SDPA for the whole batch, and the Triton kernel adds the probabilities without
    materialising them. "explicit": softmax probabilities per block of query rows; the conditional half's output is
    computed from them (probs @ V), so no Q Kᵀ is computed twice, and fused SDPA runs on the unconditional half; on
    the CPU a layer whose whole batch fits one block (``CPU_BLOCK_BYTES``) takes the explicit product for the whole
    batch instead (``whole_batch``).

    ``key_pool`` f > 1 (a self layer past ``max_self_entries``): each row's keys are summed in f x f blocks of the
    grid before they are added, [.., queries, keys / f²]; linear, so the time average commutes with it. The Triton
    kernel adds full rows, so such a layer computes its probabilities in query blocks on either path."""

    def __init__(
        self, layer: AttentionLayer, n_keys: int, max_samples: int, guided: bool, weight: torch.Tensor, path: str,
        query_chunk: int, scores_dtype: torch.dtype, key_pool: int = 1,
    ):
        self.guided = guided
        self.weight = weight
        self.path = path
        self.grid, self.key_pool = layer.grid, key_pool
        device = weight.device
        n_queries = layer.tokens
        self.sum = torch.zeros(max_samples, n_queries, n_keys // key_pool**2, dtype=torch.float32, device=device)
        self.query_chunk = min(query_chunk, n_queries)
        # Off the GPU, the per-block scores and probabilities go into buffers allocated once: fresh multi-MiB tensors
        # every block are returned to the OS and page-faulted back in by glibc malloc (140k faults per 30-step batch
        # on the 2-core dev machine, most of the capture overhead then). On CUDA the caching allocator recycles them.
        self.scores = self.probs = None
        self.whole_batch = False  # one block of explicit probabilities for the whole batch, not only its conditional half
        if device.type == "cpu":
            batch_rows = max_samples * (2 if guided else 1)
            self.whole_batch = (path == "explicit" and self.query_chunk == n_queries
                                and batch_rows * layer.heads * n_queries * n_keys * 4 <= CPU_BLOCK_BYTES)
            rows = batch_rows if self.whole_batch else max_samples
            row_bytes = rows * layer.heads * n_keys * 4
            self.query_chunk = max(1, min(self.query_chunk, CPU_BLOCK_BYTES // row_bytes))
            block = rows * layer.heads * self.query_chunk * n_keys
            self.scores = torch.empty(block, dtype=scores_dtype, device=device)  # the dtype Q Kᵀ is computed in
            self.probs = torch.empty(block, dtype=torch.float32, device=device)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if attention_mask is not None:
            raise NotImplementedError("capturing a layer called with an attention mask is not supported")
        return _attention_output(attn, hidden_states, encoder_hidden_states, temb, self._attend)

    def _attend(self, attn: Attention, query, key, value) -> torch.Tensor:
        """The attention product of a captured call; the capture reuses the layer's own Q, K (and V) projections."""
        cond = _conditional_half(query.shape[0], self.guided)
        sums = self._sums(query.shape[0] - (cond.start or 0))
        # In eager mode a small layer costs dispatch more than arithmetic: one explicit product over the whole batch
        # replaces SDPA on the unconditional half and the concatenation (capture 0.33 vs 0.79 ms per UNet call, tiny
        # model at 64 px). Compiled code has no per-op dispatch to save.
        whole = self.whole_batch and not torch.compiler.is_compiling()
        rows = slice(None) if whole else cond  # the rows whose probabilities are computed
        q, k = query[rows], key[rows]
        if attn.upcast_attention:  # the probabilities in fp32, as the layer's own attention computes them
            q, k = q.float(), k.float()
        if self.path == "fused":
            out = F.scaled_dot_product_attention(query, key, value)
            if self.key_pool == 1:
                add_head_summed_probabilities(q, k, attn.scale, self.weight, sums)
                return out
            for block_rows, probs in _probabilities(q, k, attn.scale, self.query_chunk, self.scores, self.probs):
                _accumulate(sums, block_rows, probs, self.weight, self.grid, self.key_pool)
            return out
        options = (self.weight, sums, self.scores, self.probs, self.query_chunk, list(self.grid), self.key_pool)
        if whole:
            return _explicit_attention(q, k, value, attn.scale, *options, cond.start or 0)
        # Under torch.compile, a layer done in several blocks calls the op: ATen's kernels beat inductor's code for
        # them (16 vs 29 ms, tiny model's 32x32 layer, CPU). Eager calls the function itself: the op's dispatch
        # alone costs ~0.1 ms a call.
        opaque = torch.compiler.is_compiling() and self.query_chunk < q.shape[2]
        out = (explicit_attention if opaque else _explicit_attention)(q, k, value[cond], attn.scale, *options, 0)
        if cond.start is None:
            return out
        uncond = slice(None, cond.start)
        return torch.cat([F.scaled_dot_product_attention(query[uncond], key[uncond], value[uncond]), out])

    def _sums(self, n_samples: int) -> torch.Tensor:
        """The running sums of a batch of ``n_samples`` (at most the capture's size: a shard's last batch is
        smaller)."""
        if n_samples > self.sum.shape[0]:
            raise ValueError(f"a batch of {n_samples} samples exceeds the capture's {self.sum.shape[0]}")
        return self.sum[:n_samples]


class WeightedCapture:
    """What every capture shares, whatever its backbone (UNet, or an MM-DiT's transformer): the 0-d weight tensor its
    processors read (1 for a backbone call inside the capture window, else 0), the batch's class token positions,
    the count of backbone calls, and installing the processors on entry / restoring the previous ones on exit (also
    on exceptions); a compiled backbone keeps them installed for good (see workers/generate.py), since its code is
    specialised to them. Subclasses say which processors (``processors``), which running sums they keep (``sums``)
    and what the maps are (``result``).

    Per batch: ``begin(token_positions, window)`` zeroes the sums; run the pipeline with
    ``callback_on_step_end=capture.step_end``, which sets the next call's weight; ``result()`` divides by the
    weights' total. ``guided``: the backbone runs classifier-free guidance (batch = [unconditional, conditional])."""

    def __init__(self, backbone: torch.nn.Module, max_samples: int, guided: bool):
        self.backbone = backbone
        self.max_samples = max_samples
        self.guided = guided
        self.weight = torch.zeros((), dtype=torch.float32, device=backbone.device)  # the running call's weight
        self.token_positions: list[list[int]] = []
        self.window: tuple[int, int] | None = None
        self.calls = 0  # backbone calls of this batch reported by step_end
        self._restore = ExitStack()

    def processors(self) -> dict:
        raise NotImplementedError

    def sums(self) -> list[torch.Tensor]:
        """The running sums, zeroed by ``begin``."""
        raise NotImplementedError

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the processors keep between backbone calls (weight, sums, block buffers): the inputs a compiled
        backbone reads and updates in place."""
        return [self.weight, *self.sums()]

    def begin(self, token_positions: Sequence[Sequence[int]], window: tuple[int, int] | None = None) -> "WeightedCapture":
        """Start a batch: zero the sums and weight the first backbone call. ``window``: [start, stop) call indices
        averaged into the maps; None: every call."""
        if not token_positions or any(len(p) == 0 for p in token_positions):
            raise ValueError("every sample needs at least one class token position")
        if len(token_positions) > self.max_samples:
            raise ValueError(f"a batch of {len(token_positions)} samples exceeds the capture's {self.max_samples}")
        for t in self.sums():
            t.zero_()
        self.token_positions = [list(p) for p in token_positions]
        self.window = window
        self.calls = 0
        self.weight.fill_(self._weight_of(0))
        return self

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end`` (a step is one backbone call): ``advance``, nothing changed."""
        runs = getattr(pipe, "do_classifier_free_guidance", False)  # FluxPipeline has none: it never does
        if runs != self.guided:
            raise RuntimeError(f"capture built for guided={self.guided}, the pipeline runs guided={runs}")
        self.advance()
        return {}

    def advance(self) -> None:
        """One backbone call has run: weight the next one (a device-side fill, no host sync)."""
        self.calls += 1
        self.weight.fill_(self._weight_of(self.calls))

    def _weight_of(self, call: int) -> float:
        return 1.0 if self.window is None or self.window[0] <= call < self.window[1] else 0.0

    def _total(self) -> tuple[float, int]:
        """(the weights' total, the calls averaged) of the batch begun last."""
        weights = [self._weight_of(call) for call in range(self.calls)]
        if not sum(weights):
            raise RuntimeError(
                f"capture window {self.window} averaged none of the {self.calls} backbone calls reported by "
                "step_end; it must cover at least one call"
            )
        return sum(weights), sum(w > 0 for w in weights)

    def __enter__(self) -> "WeightedCapture":
        self._restore.enter_context(installed_processors(self.backbone, self.processors()))
        return self

    def __exit__(self, *exc) -> None:
        self._restore.close()


class SeeDiffCapture(WeightedCapture):
    """Capture processors on the planned layers of ``unet`` for batches of up to ``max_samples`` samples (see
    ``WeightedCapture`` for the per-batch protocol). ``token_positions[i]`` are sample i's class sub-token positions
    in its tokenized prompt. ``path``: "fused" (SDPA + Triton kernel; default on CUDA when Triton imports) or
    "explicit". ``latent_size``: side, or (height, width); ``layers``: which layers (default: SD 1.x/2.x's);
    ``max_self_entries``: see ``plan_seediff_layers``."""

    def __init__(
        self,
        unet: torch.nn.Module,
        latent_size: int | tuple[int, int],
        max_samples: int,
        *,
        guided: bool = True,
        text_tokens: int = 77,
        path: str | None = None,
        query_chunk: int = 1024,
        layers: LayerChoice = SD_LAYERS,
        max_self_entries: int | None = None,
    ):
        super().__init__(unet, max_samples, guided)
        self.unet = unet
        located = locate_attention_layers(unet, latent_size)
        self.plan = plan_seediff_layers(located, latent_size, layers, max_self_entries)
        device = unet.device
        self.path = path or default_path(device)
        if self.path not in CAPTURE_PATHS:
            raise ValueError(f"capture path must be one of {CAPTURE_PATHS}, got {self.path!r}")
        if self.path == "fused" and add_head_summed_probabilities is None:
            raise ValueError("the fused capture path needs Triton (pip install triton; TRITON_INTERPRET=1 off CUDA)")

        def processor(layer: AttentionLayer, n_keys: int, pool: int = 1) -> AttentionSum:
            upcast = unet.get_submodule(layer.key.removesuffix(".processor")).upcast_attention
            scores_dtype = torch.float32 if upcast else unet.dtype
            return AttentionSum(
                layer, n_keys, max_samples, guided, self.weight, self.path, query_chunk, scores_dtype, pool
            )

        # Full [queries, 77] rows of the coarse cross layers (0.08 MB per image and layer at SD1.5): which columns
        # are class tokens changes per batch, and is applied in result(), outside the UNet.
        self.cross = [processor(l, text_tokens) for l in self.plan.cross]
        self.self_attn = [processor(l, l.tokens, pool) for l, pool in zip(self.plan.self_attn, self.plan.key_pool)]

    def processors(self) -> dict[str, AttentionSum]:
        out = {l.key: p for l, p in zip(self.plan.cross, self.cross)}
        out.update({l.key: p for l, p in zip(self.plan.self_attn, self.self_attn)})
        return out

    def sums(self) -> list[torch.Tensor]:
        return [p.sum for p in self.processors().values()]

    def tensors(self) -> list[torch.Tensor]:
        kept = super().tensors()
        for p in self.processors().values():
            kept += [t for t in (p.scores, p.probs) if t is not None]
        return kept

    def result(self) -> CapturedAttention:
        """The time-averaged maps of the batch begun last (fresh tensors: the sums are reused by the next batch)."""
        total, calls = self._total()
        n = len(self.token_positions)
        grid = self.plan.cross[0].grid
        averages = [p.sum[:n] / total for p in self.cross]  # [layer] -> [n, N, text tokens]
        cross = [
            torch.cat([a[i][:, columns].T for a in averages]).view(-1, *grid)
            for i, columns in enumerate(self.token_positions)
        ]
        return CapturedAttention(cross=cross, self_attn=tuple(p.sum[:n] / total for p in self.self_attn), calls=calls)


def default_path(device: torch.device) -> str:
    """The fused path where it is fast (CUDA with Triton); elsewhere the explicit one."""
    return "fused" if device.type == "cuda" and add_head_summed_probabilities is not None else "explicit"


def install_processors(unet: torch.nn.Module, processors: dict) -> dict:
    """Set ``processors`` on their layers (all others keep theirs); returns the previous set. set_attn_processor
    consumes the dict it gets, so each call gets a fresh copy."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({**saved, **processors})
    return saved


@contextmanager
def installed_processors(unet: torch.nn.Module, processors: dict) -> Iterator[None]:
    """``install_processors`` for the block; the saved set is restored on exit."""
    saved = install_processors(unet, processors)
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


def grid_at_depth(latent_size: int | tuple[int, int], depth: int) -> tuple[int, int]:
    """(height, width) of the feature grid ``depth`` downsamplings below a latent of ``latent_size`` (side or
    (height, width))."""
    grid = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    for _ in range(depth):
        grid = tuple(math.ceil(n / 2) for n in grid)
    return grid


def _conditional_half(batch: int, guided: bool) -> slice:
    """diffusers stacks [unconditional, conditional] under classifier-free guidance."""
    if not guided:
        return slice(None)
    if batch % 2:
        raise ValueError(f"attention batch {batch} is odd, but the capture expects classifier-free guidance")
    return slice(batch // 2, None)


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


def _explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    weight: torch.Tensor,
    sums: torch.Tensor,
    scores: torch.Tensor | None,
    probs: torch.Tensor | None,
    chunk: int,
    grid: list[int],
    key_pool: int,
    sums_from: int,
) -> torch.Tensor:
    """The explicit path: softmax probabilities per block of ``chunk`` query rows, the attention output computed from
    them (probs @ V, so no Q Kᵀ is computed twice), and ``sums += weight · Σ_heads probs`` of the batch rows from
    ``sums_from`` on, the conditional ones (keys summed in ``key_pool`` x ``key_pool`` blocks of ``grid``).
    ``scores``/``probs``: flat buffers for the blocks (off the GPU), or None."""
    out = torch.empty((*query.shape[:3], value.shape[-1]), dtype=value.dtype, device=value.device)
    values_t = value.transpose(-1, -2)
    for rows, block in _probabilities(query, key, scale, chunk, scores, probs):
        # probs @ V computed as (Vᵀ probsᵀ)ᵀ: oneDNN's CPU GEMM is ~3x slower with few output columns (head
        # dim 8) than with few output rows; with SD's head dims (40-64) both forms cost the same.
        out[:, :, rows] = (values_t @ block.to(value.dtype).transpose(-1, -2)).transpose(-1, -2)
        _accumulate(sums, rows, block[sums_from:], weight, tuple(grid), key_pool)
    return out


# The same as a custom op: a compiled UNet calls it as one opaque, ATen-backed node where inductor's own code is slower
# (AttentionSum._attend says where; bench/RESULTS.md has the figures).
explicit_attention = torch.library.custom_op(
    "seediff::explicit_attention", _explicit_attention, mutates_args=("sums", "scores", "probs")
)


@explicit_attention.register_fake
def _(query, key, value, scale, weight, sums, scores, probs, chunk, grid, key_pool, sums_from) -> torch.Tensor:
    """Shapes only, for torch.compile's tracing."""
    return query.new_empty((*query.shape[:3], value.shape[-1]), dtype=value.dtype)


def _probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    chunk: int,
    scores: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """softmax(Q Kᵀ · scale) per head in fp32, one block of ``chunk`` query rows at a time so the transient stays
    [B, heads, rows, n_keys]. With flat ``scores``/``probs`` buffers the block goes into them (valid until the next
    block)."""
    key_t = key.transpose(-1, -2)
    for start in range(0, query.shape[2], chunk):
        rows = slice(start, start + chunk)
        block = query[:, :, rows] * scale
        shape = (*block.shape[:3], key.shape[2])
        if scores is None or probs is None:
            yield rows, torch.softmax(block @ key_t, dim=-1, dtype=torch.float32)
            continue
        size = math.prod(shape)
        products = torch.matmul(block, key_t, out=scores[:size].view(shape))
        yield rows, torch.softmax(products, dim=-1, dtype=torch.float32, out=probs[:size].view(shape))


def _accumulate(
    sums: torch.Tensor, rows: slice, probs: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int], key_pool: int
) -> None:
    """``sums[:, rows] += weight · Σ_heads probs`` ([B, heads, rows, keys] probabilities) as one batched product of a
    weight row [1, heads] and each sample's [heads, rows·keys]: probs are read once, no head-sum temporary. With
    ``key_pool`` f > 1 each row's keys are first summed in f x f blocks of the layer's ``grid``."""
    batch, heads = probs.shape[:2]
    if key_pool > 1:
        (h, w), f = grid, key_pool
        probs = probs.reshape(*probs.shape[:-1], h // f, f, w // f, f).sum((-3, -1)).flatten(-2)
    sums[:, rows].view(batch, 1, -1).baddbmm_(weight.expand(batch, 1, heads), probs.reshape(batch, heads, -1))
