"""Decode attention over a KV cache: split-K "flash-decoding" in Triton (inference only).

Algorithm (Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023; the
split-KV kernels of FlashAttention-2 / FlashInfer; our own code):

- During decoding only Tq (1..4 typically) queries per (batch, head) exist, so one program per
  (batch, head) would leave most SMs idle at B*H = 96 while it streams a long cache. The cache's
  T_max positions are cut into NUM_SPLITS chunks; program (b*h, q tile, split) runs an online
  softmax over its chunk and writes an unnormalised partial (O_s normalised by its own sum, plus
  LSE_s in log2 units, fp32).
- A combine kernel merges the splits per (b, h, query): out = sum_s w_s O_s / sum_s w_s with
  w_s = exp2(LSE_s - max_s LSE_s) (the log-sum-exp merge).
- Lengths are read on the device (per sequence, `cache_lens[b]`), never on the host: the launch
  does not synchronise and can be captured in a CUDA graph. Chunks wholly past a row's length
  skip their loop (empty range) and write LSE = -inf, which the merge weighs 0. Positions past
  the length are never loaded (masked loads), so garbage/NaN there cannot leak in.
- Queries are padded to a BLOCK_Q = 16 tile so QK^T and PV run on tensor cores (`tl.dot` needs
  16 rows); the wasted rows cost compute, not memory traffic, and decoding is memory-bound.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import INTERPRET, check_cuda_or_interpret, dot_precision

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
BLOCK_Q = 16


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    Q, K, V,
    LENS,                    # (B,) int32/int64: valid cache length incl. the Tq new tokens
    O_PART,                  # (B*H, NUM_SPLITS, Tq, D) fp32
    LSE_PART,                # (B*H, NUM_SPLITS, Tq) fp32, log2 units
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    H, Tq,
    chunk,                   # cache positions per split (a multiple of BLOCK_N)
    num_splits,
    qk_scale,                # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    q_tile = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    length = tl.load(LENS + b).to(tl.int32)
    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_q < Tq
    q_pos = length - Tq + offs_q  # absolute cache position of each query
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)  # (BLOCK_Q, D)
    K_base = K + b64 * stride_kb + h64 * stride_kh
    V_base = V + b64 * stride_vb + h64 * stride_vh

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)  # lo >= hi: this split holds no valid position
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k = tl.load(K_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_N)
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A query may see nothing in this tile (its position precedes the chunk): keep its max
        # at -inf but subtract 0 so exp2 gives 0 instead of exp2(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = (bh.to(tl.int64) * num_splits + split) * Tq
    tl.store(LSE_PART + part + offs_q, lse, mask=q_ok)
    tl.store(O_PART + (part + offs_q[:, None]) * HEAD_DIM + offs_d[None, :], out, mask=q_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART,        # as written by _decode_split_kernel
    OUT,                     # (B, H, Tq, D) contiguous, q's dtype
    Tq,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,   # next power of two >= num_splits
):
    row = tl.program_id(0).to(tl.int64)  # = bh * Tq + query
    bh = row // Tq
    qi = row % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    part = (bh * num_splits + offs_s) * Tq + qi  # (BLOCK_S,)
    lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    # Split 0 always holds position 0, which every query sees: the max is finite.
    w = tl.exp2(lse - tl.max(lse, 0))  # (BLOCK_S,)
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + row * HEAD_DIM + offs_d, out.to(OUT.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers


def _num_splits(BH: int, T_max: int, block_n: int, device: torch.device) -> int:
    """Enough (batch*head, split) programs to fill the GPU about twice; never a split shorter than
    one tile. Depends on shapes only (not on the lengths), so it needs no device sync."""
    max_splits = triton.cdiv(T_max, block_n)
    if INTERPRET or device.type != "cuda":
        return min(max_splits, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, triton.cdiv(2 * sms, BH), 64))


def _check(q, k_cache, v_cache, cache_lens) -> None:
    check_cuda_or_interpret("decode_attention", q, k_cache, v_cache, cache_lens)
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: dtype must be one of {SUPPORTED_DTYPES} for q and caches, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"decode_attention: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    B, H, Tq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: caches must be ({B}, {H}, T_max, {D}), got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if cache_lens.dtype not in (torch.int32, torch.int64) or tuple(cache_lens.shape) != (B,):
        raise ValueError(f"decode_attention: cache_lens must be int32/int64 ({B},), got {cache_lens.dtype} {tuple(cache_lens.shape)}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("gptfast_triton::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """(B, H, Tq, D) in q's dtype; see `decode_attention`."""
    _check(q, k_cache, v_cache, cache_lens)
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    B, H, Tq, D = q.shape
    T_max = k_cache.shape[2]
    block_n = 16 if INTERPRET else (64 if D <= 64 else 32)
    splits = _num_splits(B * H, T_max, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(T_max, splits), block_n) * block_n
    splits = triton.cdiv(T_max, chunk)
    o_part = torch.empty((B * H, splits, Tq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * H, splits, Tq), dtype=torch.float32, device=q.device)
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    wrap_triton(_decode_split_kernel)[(B * H, triton.cdiv(Tq, BLOCK_Q), splits)](
        q, k_cache, v_cache, cache_lens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, Tq, chunk, splits, scale * LOG2E,
        HEAD_DIM=D, PRECISION=dot_precision(q.dtype), BLOCK_Q=BLOCK_Q, BLOCK_N=block_n,
        num_warps=4, num_stages=1 if INTERPRET else 3,
    )
    wrap_triton(_decode_combine_kernel)[(B * H * Tq,)](
        o_part, lse_part, out, Tq, splits,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(splits), num_warps=1 if INTERPRET else 2,
    )
    return out


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale):
    return q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the newest Tq tokens against a KV cache (semantics of `reference.decode_attention`).

    q: (B, H, Tq, D); k_cache, v_cache: (B, H, T_max, D), fp16/bf16/fp32, D in SUPPORTED_HEAD_DIMS;
    cache_lens: (B,) int32/int64 on the same device, Tq <= cache_lens[b] <= T_max (not checked
    here: the dispatch layer checks it where a host read is allowed). Returns (B, H, Tq, D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.gptfast_triton.decode_attention(q, k_cache, v_cache, cache_lens, scale)
