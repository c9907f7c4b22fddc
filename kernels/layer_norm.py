"""LayerNorm over the last dimension, forward and backward in Triton.

Algorithm (Ba et al. 2016; kernel layout after Triton tutorial 05 "Layer Normalization" and
flash-attention's `ops/triton/layer_norm.py`, our own code):

- Forward: one program per row; the whole row (N up to MAX_N) sits in registers as one
  BLOCK_N = next_power_of_2(N) tile (masked tail), so x is read once. Mean and biased variance are
  computed in fp32 (two-pass on the register tile: no E[x^2] - E[x]^2 cancellation) and saved,
  with rstd, for the backward: 8 bytes per row instead of recomputing them from x.
- Backward: dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)), per row. dW = sum_rows dy*xhat
  and dB = sum_rows dy are reductions over *all* rows: each of G programs walks a contiguous
  slab of rows, accumulates its partial dW/dB in fp32 registers and writes them to its own row
  of a (G, N) buffer; a second kernel sums the G partials per column. No atomics, so the result is
  deterministic and there is no race (the tutorial's lock-based accumulation is avoided).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import INTERPRET, check_cuda_or_interpret

MAX_N = 16384  # one row must fit in registers: 16K fp32 over 16 warps = 32 values per thread
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B,
    MEAN, RSTD,              # (M,) fp32, saved for the backward
    stride_x, stride_y,      # row strides (unit stride along N)
    N,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / N
    xc = tl.where(mask, x - mean, 0.0)  # padding must not enter the variance
    var = tl.sum(xc * xc, 0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_dx_kernel(
    X, DY, DX, W,
    MEAN, RSTD,
    DW_PART, DB_PART,        # (G, N) fp32: this program's partial dW / dB row
    stride_x, stride_dy, stride_dx,
    M, N,
    rows_per_program,
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Row pointers advance by their stride each step; the start offset is int64 so a
    # (M, N) buffer past 2^31 elements still addresses correctly.
    start = row_start.to(tl.int64)
    x_ptr = X + start * stride_x
    dy_ptr = DY + start * stride_dy
    dx_ptr = DX + start * stride_dx
    for r in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r)
        rstd = tl.load(RSTD + r)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_W:
            wdy = w * dy
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, 0) / N
        c2 = tl.sum(wdy, 0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DW_PART, DB_PART,        # (G, N) fp32 partials
    DW, DB,                  # (N,) outputs in the parameter dtype
    G, N,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dw = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        if NEED_DW:
            dw += tl.load(DW_PART + offs, mask=mask, other=0.0)
        if NEED_DB:
            db += tl.load(DB_PART + offs, mask=mask, other=0.0)
    if NEED_DW:
        tl.store(DW + cols, tl.sum(dw, 0).to(DW.dtype.element_ty), mask=cols < N)
    if NEED_DB:
        tl.store(DB + cols, tl.sum(db, 0).to(DB.dtype.element_ty), mask=cols < N)


# ----------------------------------------------------------------------------- launchers


def _block_and_warps(N: int) -> tuple[int, int]:
    block = triton.next_power_of_2(N)
    # About 8-16 fp32 values per thread: fewer warps for short rows so lanes are not idle.
    warps = 1 if INTERPRET else min(max(block // 256, 1), 16)
    return block, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with a unit column stride (a copy only if x is not row-major)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    check_cuda_or_interpret("layer_norm", x, weight, bias)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    N = x.shape[-1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"layer_norm: last dim N must be in [1, {MAX_N}], got {N}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (tuple(t.shape) != (N,) or t.dtype != x.dtype):
            raise ValueError(f"layer_norm: {name} must be ({N},) {x.dtype}, got {tuple(t.shape)} {t.dtype}")


@triton_op("gptfast_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., N) in x's dtype, mean (M,) fp32, rstd (M,) fp32) with M = x.numel() // N."""
    _check(x, weight, bias)
    x2 = _rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(N)
    if M > 0:
        wrap_triton(_layer_norm_fwd_kernel)[(M,)](
            x2, y, weight, bias, mean, rstd, x2.stride(0), y.stride(0), N, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block, num_warps=warps,
        )
    return y.view(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32)


def _num_partials(M: int, device: torch.device) -> int:
    """How many programs share the rows in the backward (= rows of the partial dW/dB buffer)."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(M, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(M, 4 * sms))


@triton_op("gptfast_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dW (N,), dB (N,)); dW / dB are empty (0,) tensors when not needed."""
    x2, dy2 = _rows(x), _rows(dy)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    G = _num_partials(M, x.device)
    rows_per_program = triton.cdiv(M, G) if M > 0 else 1
    G = triton.cdiv(M, rows_per_program) if M > 0 else 1
    dw_part = torch.empty((G, N) if need_dw else (0,), dtype=torch.float32, device=x.device)
    db_part = torch.empty((G, N) if need_db else (0,), dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(N)
    if M > 0:
        wrap_triton(_layer_norm_bwd_dx_kernel)[(G,)](
            x2, dy2, dx, weight, mean, rstd, dw_part, db_part,
            x2.stride(0), dy2.stride(0), dx.stride(0), M, N, rows_per_program,
            HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=block,
            num_warps=warps,
        )
    dw = torch.empty((N,) if need_dw else (0,), dtype=x.dtype, device=x.device)
    db = torch.empty((N,) if need_db else (0,), dtype=x.dtype, device=x.device)
    if need_dw or need_db:
        if M == 0:
            dw.zero_()
            db.zero_()
        else:
            block_n = 64 if INTERPRET else 128
            wrap_triton(_layer_norm_bwd_dwdb_kernel)[(triton.cdiv(N, block_n),)](
                dw_part, db_part, dw, db, G, N,
                NEED_DW=need_dw, NEED_DB=need_db, BLOCK_G=16 if INTERPRET else 32, BLOCK_N=block_n,
            )
    return dx.view(x.shape), dw, db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_dw, need_db):
    N = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((N,) if need_dw else (0,)),
            x.new_empty((N,) if need_db else (0,)))


# ----------------------------------------------------------------------------- autograd + public


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.gptfast_triton.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dw, db = torch.ops.gptfast_triton.layer_norm_bwd(dy, x, weight, mean, rstd, need_dw, need_db)
        return dx, (dw if need_dw else None), (db if need_db else None), None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance), as `torch.nn.functional.layer_norm`.

    x: (..., N) fp16/bf16/fp32, N <= MAX_N; weight, bias: (N,) in x's dtype or None.
    Returns x's shape and dtype; differentiable w.r.t. x, weight, bias.
    """
    _check(x, weight, bias)
    return _LayerNorm.apply(x, weight, bias, float(eps))
