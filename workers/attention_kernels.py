"""Fused Triton kernels that add head-summed self-attention probabilities straight into an fp32 accumulator.

Why: capturing a 64x64 self-attention layer with torch ops writes and re-reads the [B, heads, N, N] scores several
times (matmul, softmax, head sum, accumulate); on an H100 that memory traffic, not arithmetic, is what capture costs.
These kernels never materialise the scores: pass 1 computes each row's log-sum-exp per head (flash-attention style
online max/sum), pass 2 recomputes each [query block x key block] tile for every head, turns it into probabilities
with exp2(s - lse) and adds the head sum to the accumulator tile once. Traffic per image and call is about one
read+write of the fp32 accumulator; the extra matmuls are a few GFLOP.

The capture's "fused" path (``seediff.workers.capture``): the default on CUDA when Triton imports; on the CPU it runs
under Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported), which is how the test suite
runs it. Registered as a torch custom op that mutates its accumulator, so torch.compile keeps it as one opaque call
in the UNet's graph (no graph break) and CUDA graphs can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    n_heads, n_queries, n_keys, head_dim, qk_scale_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // n_heads, bh % n_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=(rows[:, None] < n_queries) & (dims[None, :] < head_dim), other=0.0,
    )
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
            mask=(cols[:, None] < n_keys) & (dims[None, :] < head_dim), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(cols[None, :] < n_keys, s * qk_scale_log2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(lse_ptr + bh * n_queries + rows, row_max + tl.log2(row_sum), mask=rows < n_queries)


@triton.jit
def _add_head_summed_probs_kernel(
    q_ptr, k_ptr, lse_ptr, weight_ptr, acc_ptr,
    n_heads, n_queries, n_keys, head_dim, qk_scale_log2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ab, stride_am, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < n_queries) & (dims[None, :] < head_dim)
    k_mask = (cols[:, None] < n_keys) & (dims[None, :] < head_dim)
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, n_heads):
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
            mask=q_mask, other=0.0,
        )
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
            mask=k_mask, other=0.0,
        )
        lse = tl.load(lse_ptr + (b * n_heads + h) * n_queries + rows, mask=rows < n_queries, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        total += tl.exp2(s * qk_scale_log2 - lse[:, None])
    total *= tl.load(weight_ptr)
    acc_ptrs = acc_ptr + b * stride_ab + rows[:, None] * stride_am + cols[None, :] * stride_an
    tile_mask = (rows[:, None] < n_queries) & (cols[None, :] < n_keys)
    tl.store(acc_ptrs, tl.load(acc_ptrs, mask=tile_mask, other=0.0) + total, mask=tile_mask)


@torch.library.custom_op("seediff::add_head_summed_probabilities", mutates_args=("acc",))
def add_head_summed_probabilities(
    query: torch.Tensor, key: torch.Tensor, scale: float, weight: torch.Tensor, acc: torch.Tensor
) -> None:
    """acc[b] += weight · Σ_h softmax(scale · Q[b,h] K[b,h]ᵀ), in place. query [B, H, M, D], key [B, H, N, D] in
    fp16, bf16 (products accumulate in fp32) or fp32 (IEEE products: upcast attention, and the CPU test suite),
    weight a 0-d fp32 tensor (read on the device: no host sync), acc [B, M, N] fp32 on the same device."""
    batch, heads, n_queries, head_dim = query.shape
    n_keys = key.shape[2]
    if acc.shape != (batch, n_queries, n_keys) or acc.dtype != torch.float32:
        raise ValueError(f"accumulator must be fp32 [{batch}, {n_queries}, {n_keys}], got {acc.dtype} {list(acc.shape)}")
    if query.dtype not in DTYPES or key.dtype != query.dtype:
        raise ValueError(f"query and key must share a dtype of {DTYPES}, got {query.dtype} and {key.dtype}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    lse = torch.empty(batch * heads, n_queries, device=query.device, dtype=torch.float32)
    qk_scale_log2 = scale * _LOG2E
    strides = (*query.stride(), *key.stride())
    # 64x64 tiles fit shared memory up to 256 bytes of Q/K per row (fp16 up to 128 dims); wider rows halve the tile
    block_m = block_n = 64 if block_d * query.element_size() <= 256 else 32
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # tf32 only ever applies to fp32 inputs
    _row_lse_kernel[(batch * heads, triton.cdiv(n_queries, block_m))](
        query, key, lse, heads, n_queries, n_keys, head_dim, qk_scale_log2, *strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )
    grid = (batch, triton.cdiv(n_queries, block_m), triton.cdiv(n_keys, block_n))
    _add_head_summed_probs_kernel[grid](
        query, key, lse, weight, acc, heads, n_queries, n_keys, head_dim, qk_scale_log2, *strides, *acc.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )


@add_head_summed_probabilities.register_fake
def _(query, key, scale, weight, acc) -> None:
    """Shapes only, for torch.compile's tracing: the op returns nothing and mutates ``acc``."""
