"""Causal attention, FlashAttention-2 style: forward and backward in Triton.

Algorithm (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023; the public Triton tutorial 06 "Fused Attention" is the usual reference point,
this is our own code):

- Forward: one program per (query tile of BLOCK_M rows, batch*head). It streams K/V tiles through
  on-chip memory and keeps an *online softmax* (running max m, running sum l, unnormalised output
  acc, all fp32), so the (T, T) score matrix is never written to memory. Scores are computed in
  log2 units: the softmax scale is pre-multiplied by log2(e) so every exponential is an `exp2`
  (one MUFU instruction instead of exp's extra multiply).
- Causality is used twice: key tiles strictly above the diagonal are never visited (the loop stops
  at the query tile's last row), and tiles strictly below it run without any mask; only the
  BLOCK_M / BLOCK_N tiles on the diagonal pay for the `where`.
- The forward saves O and the per-row log-sum-exp (LSE, log2 units, fp32): 4 bytes per row instead
  of the T x T probabilities. The backward *recomputes* P = exp2(S - LSE) tile by tile.
- Backward = three kernels: a preprocess computing delta_i = sum_d dO_id * O_id (the row term of the
  softmax Jacobian), a dK/dV kernel (one program per key tile, looping over the query tiles at or
  below the diagonal, so dK and dV accumulate in registers without atomics), and a dQ kernel (one
  program per query tile, looping over key tiles). Splitting dQ from dK/dV recomputes QK^T twice
  but avoids the fp32 atomic adds of FlashAttention-1's single backward kernel.

Trade-offs: head dims 16/32/64/128 (one constexpr tile width, no masking on D); fp16/bf16/fp32
(fp32 uses exact "ieee" dots, so it is slower than TF32 but matches the fp32 reference); no dropout
(the adapter refuses dropout_p > 0 with a clear reason). Any T: tails are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import bucket, check_cuda_or_interpret, configs, dot_precision

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _attn_fwd_tiles(
    acc, l_i, m_i,           # running output (BLOCK_M, D), sum (BLOCK_M,), max (BLOCK_M,); fp32
    q,                       # (BLOCK_M, D) query tile in the input dtype
    K_base, V_base,          # this (batch, head)'s K / V start
    stride_kt, stride_vt,
    lo, hi,                  # key range [lo, hi) visited by this call
    offs_m,                  # (BLOCK_M,) query positions
    T,
    qk_scale,                # softmax scale * log2(e)
    ON_DIAGONAL: tl.constexpr,  # tiles touching the diagonal need the causal mask and tail masks
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if ON_DIAGONAL:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)  # tiles below the diagonal lie entirely inside [0, T)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if ON_DIAGONAL:
            # Keys past T sit right of every valid query, so the causal mask covers the tail too.
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        # Every row has seen at least one unmasked key before (or in) its first diagonal tile, so
        # m_new is finite and exp2(-inf - m_new) = 0 needs no special case.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        if ON_DIAGONAL:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


_FWD_CONFIGS = configs(
    gpu=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2),
        ]
    ],
    # BLOCK_M = 2 x BLOCK_N so the interpreter exercises several key tiles on one diagonal.
    interp=[triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)],
)


@triton.autotune(configs=_FWD_CONFIGS, key=["HEAD_DIM", "T_BUCKET", "PRECISION"])
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,
    LSE,                     # (B*H, T) fp32, log2 units
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T,
    T_BUCKET,                # autotune key only: next power of two of T
    qk_scale,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: B*H*T*D can pass 2^31 elements
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    # Below the diagonal: no mask. On it: the causal mask. Above it: never visited.
    acc, l_i, m_i = _attn_fwd_tiles(
        acc, l_i, m_i, q, K_base, V_base, stride_kt, stride_vt, 0, start_m, offs_m, T, qk_scale,
        False, BLOCK_N, HEAD_DIM, PRECISION,
    )
    acc, l_i, m_i = _attn_fwd_tiles(
        acc, l_i, m_i, q, K_base, V_base, stride_kt, stride_vt, start_m,
        tl.minimum(start_m + BLOCK_M, T), offs_m, T, qk_scale,
        True, BLOCK_N, HEAD_DIM, PRECISION,
    )
    acc = acc / l_i[:, None]
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,
    DELTA,                   # (B*H, T) fp32: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_tiles(
    dk, dv,                  # (BLOCK_N, D) fp32 accumulators
    k, v,                    # (BLOCK_N, D) this program's key / value tile
    Q_base, DO_base,
    LSE_row, DELTA_row,      # this (batch, head)'s rows of LSE / delta
    stride_qt, stride_dot,
    offs_n,
    lo, hi,                  # query range [lo, hi)
    T,
    qk_scale,
    ON_DIAGONAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = tl.load(Q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        # LSE = +inf on padding rows makes their recomputed probabilities exactly 0.
        lse = tl.load(LSE_row + offs_m, mask=m_ok, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T
        p_t = tl.exp2(s_t - lse[None, :])
        if ON_DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(DO_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        delta = tl.load(DELTA_row + offs_m, mask=m_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = dP^T
        ds_t = p_t * (dp_t - delta[None, :])  # softmax Jacobian: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


_DKDV_CONFIGS = configs(
    # BLOCK_N must be a multiple of BLOCK_M: the diagonal of a key tile is walked in query steps.
    gpu=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2)]
    ],
    interp=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)],
)


@triton.autotune(configs=_DKDV_CONFIGS, key=["HEAD_DIM", "T_BUCKET", "PRECISION"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,
    DK, DV,                  # (B, H, T, D) contiguous outputs
    LSE, DELTA,              # (B*H, T) fp32
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    H, T,
    T_BUCKET,
    sm_scale,                # softmax scale (natural units), applied once to dK at the end
    qk_scale,                # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=n_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    Q_base = Q + b * stride_qb + h * stride_qh
    DO_base = DO + b * stride_dob + h * stride_doh
    LSE_row = LSE + bh.to(tl.int64) * T
    DELTA_row = DELTA + bh.to(tl.int64) * T
    # Queries before start_n never see these keys; those on the diagonal need the mask.
    dk, dv = _attn_bwd_dkdv_tiles(
        dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qt, stride_dot, offs_n,
        start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale,
        True, BLOCK_M, HEAD_DIM, PRECISION,
    )
    dk, dv = _attn_bwd_dkdv_tiles(
        dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qt, stride_dot, offs_n,
        start_n + BLOCK_N, T, T, qk_scale,
        False, BLOCK_M, HEAD_DIM, PRECISION,
    )
    out_off = bh.to(tl.int64) * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _attn_bwd_dq_tiles(
    dq,                      # (BLOCK_M, D) fp32 accumulator
    q, do,                   # (BLOCK_M, D) this program's query / output-grad tile
    lse, delta,              # (BLOCK_M,) fp32
    K_base, V_base,
    stride_kt, stride_vt,
    offs_m,
    lo, hi,                  # key range [lo, hi)
    T,
    qk_scale,
    ON_DIAGONAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if ON_DIAGONAL:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if ON_DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


_DQ_CONFIGS = configs(
    # BLOCK_M must be a multiple of BLOCK_N (diagonal walked in key steps).
    gpu=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2)]
    ],
    interp=[triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)],
)


@triton.autotune(configs=_DQ_CONFIGS, key=["HEAD_DIM", "T_BUCKET", "PRECISION"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,
    DQ,                      # (B, H, T, D) contiguous output
    LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    H, T,
    T_BUCKET,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    K_base = K + b * stride_kb + h * stride_kh
    V_base = V + b * stride_vb + h * stride_vh
    dq = _attn_bwd_dq_tiles(
        dq, q, do, lse, delta, K_base, V_base, stride_kt, stride_vt, offs_m, 0, start_m, T, qk_scale,
        False, BLOCK_N, HEAD_DIM, PRECISION,
    )
    dq = _attn_bwd_dq_tiles(
        dq, q, do, lse, delta, K_base, V_base, stride_kt, stride_vt, offs_m,
        start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
        True, BLOCK_N, HEAD_DIM, PRECISION,
    )
    out_off = bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------- launchers


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_cuda_or_interpret("causal_attention", q, k, v)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"causal_attention: q, k, v must share a (B, H, T, D) shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"causal_attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"causal_attention: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
        )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/time strides but need a unit stride along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("gptfast_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, H, T, D) in q's dtype, LSE (B, H, T) fp32 in log2 units)."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, T, bucket(T), scale * LOG2E,
        HEAD_DIM=D, PRECISION=dot_precision(q.dtype),
    )
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@triton_op("gptfast_triton::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), each (B, H, T, D) contiguous in q's dtype."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, H, T, D = q.shape
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    block = 32 if D <= 64 else 16  # delta is memory-bound: tile size matters little
    wrap_triton(_attn_bwd_delta_kernel)[(triton.cdiv(T, block), B * H)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, T, HEAD_DIM=D, BLOCK_M=block,
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
    )
    prec = dot_precision(q.dtype)
    wrap_triton(_attn_bwd_dkdv_kernel)[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *strides, H, T, bucket(T), scale, scale * LOG2E,
        HEAD_DIM=D, PRECISION=prec,
    )
    wrap_triton(_attn_bwd_dq_kernel)[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *strides, H, T, bucket(T), scale, scale * LOG2E,
        HEAD_DIM=D, PRECISION=prec,
    )
    return dq, dk, dv


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


# ----------------------------------------------------------------------------- autograd + public


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = torch.ops.gptfast_triton.attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.gptfast_triton.attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v with FlashAttention-2 kernels.

    q, k, v: (B, H, T, D) fp16/bf16/fp32 CUDA tensors (CPU under TRITON_INTERPRET=1), D in
    SUPPORTED_HEAD_DIMS, unit stride along D preferred (other strides are copied).
    scale: defaults to 1/sqrt(D). Returns (B, H, T, D) in q's dtype; differentiable w.r.t. q, k, v.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CausalAttention.apply(q, k, v, scale)
