"""Linear layers with quantized weights: y = x W^T + b, W stored as int8 or packed int4 (issue #20).

Formats (gptfast.ops.quant, the lead's contract): int8 per output channel (scale (N,) fp32) or per
group of g = 32 / 64 / 128 along K (scale (N, K/g) fp16; llama.cpp's q8_0 at g = 32); int4 in
groups, two nibbles per byte in llama.cpp q4_0's order (byte j of each 16-byte block holds k = j
in its low and k = j + 16 in its high nibble), w = (u - 8) * scale (+ zero).

Algorithm (weight-only quantization, dequantize in registers: gpt-fast's int8 / int4 linears,
github.com/pytorch-labs/gpt-fast, and Marlin, Frantar et al. 2024, "MARLIN: Mixed-Precision
Auto-Regressive Parallel Inference on Large Language Models"; our own code): at decoding sizes
(M = 1..64 rows) a linear layer is memory bound, so the kernel's job is to read each quantized
weight byte once and never write a dequantized copy. Program (n tile, m tile) walks K in
BLOCK_K chunks: it loads a (BLOCK_N, BLOCK_K) tile of int8 (or (BLOCK_N, BLOCK_K / 2) bytes of
int4), unpacks nibbles with a mask and a shift, applies the group scales (and zeros) in fp32 by
viewing the tile as (BLOCK_N, groups, group_size), and multiplies with the matching x tile,
accumulating in fp32. Two inner products, picked by M:

- GEMV (M <= GEMV_MAX_M, decoding): a broadcast multiply and a row sum in fp32 (CUDA cores); the
  dequantized tile never leaves fp32, and tl.dot's 16-row minimum would waste 15/16 of it.
- small-M GEMM (larger M): tl.dot on a BLOCK_M = 16..64 row tile, the dequantized weight tile cast
  to x's dtype (exact for int8 and int4 values; the group scale is one rounding, as in the
  reference that dequantizes to x's dtype), fp32 accumulation (ieee for fp32 inputs).

int4 nibble order without shuffles: the low nibbles of a tile's bytes are the weights of
k = 32 b + j and the high nibbles those of k = 32 b + j + 16, so instead of interleaving the two
halves back into k order, x is loaded twice at those two offset patterns and each half is
multiplied with its own x half (two half-width products per chunk).

Per-channel int8 applies its scale once to the accumulator (exact int8 values inside the loop).
BLOCK_K is a multiple of every group size (>= 128), so a chunk always holds whole groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import INTERPRET, bucket, check_cuda_or_interpret, configs, dot_precision

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZES = (32, 64, 128)  # = gptfast.ops.quant.GROUP_SIZES (kernels import nothing from ops)
INT4_BLOCK = 32
GEMV_MAX_M = 4  # rows up to which the broadcast-sum GEMV runs; above, the tl.dot GEMM


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _scale_groups(w, S, Z, offs_n, n_ok, g0, NG, stride_sn,
                  BLOCK_N: tl.constexpr,
                  GT: tl.constexpr,         # groups in this tile
                  COLS: tl.constexpr,       # tile columns per group
                  HAS_ZERO: tl.constexpr):
    """w (BLOCK_N, GT * COLS) fp32 -> w * scale[n, g] (+ zero[n, g]), g = g0 + column // COLS."""
    offs_g = g0 + tl.arange(0, GT)
    ptr = offs_n[:, None].to(tl.int64) * stride_sn + offs_g[None, :]
    ok = n_ok[:, None] & (offs_g < NG)[None, :]
    s = tl.load(S + ptr, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_N, GT)
    w3 = tl.reshape(w, (BLOCK_N, GT, COLS)) * s[:, :, None]
    if HAS_ZERO:
        z = tl.load(Z + ptr, mask=ok, other=0.0).to(tl.float32)
        w3 = w3 + z[:, :, None]
    return tl.reshape(w3, (BLOCK_N, GT * COLS))


@triton.jit
def _mac(acc, x, w, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += x (BLOCK_M, C) @ w (BLOCK_N, C)^T."""
    if USE_DOT:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _quant_linear_kernel(
    X,                       # (M, K) x, unit stride along K
    QW,                      # (N, K) int8 or (N, K/2) uint8 packed int4, unit stride along K
    S,                       # (N,) fp32 per channel (GROUP == 0) or (N, K/GROUP) group scales
    Z,                       # (N, K/GROUP) zeros (HAS_ZERO)
    BIAS,                    # (N,) (HAS_BIAS)
    Y,                       # (M, N) contiguous, x's dtype
    M, N, K,
    M_BUCKET,                # autotune key only
    stride_xm, stride_qn, stride_sn,
    BITS: tl.constexpr,      # 8 or 4
    GROUP: tl.constexpr,     # 0 = per output channel (int8), else 32 / 64 / 128
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,   # tl.dot GEMM (BLOCK_M >= 16) or broadcast-sum GEMV
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,   # a multiple of GROUP and of 32
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = QW + offs_n[:, None].to(tl.int64) * stride_qn
    NG = K // tl.maximum(GROUP, 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            if GROUP > 0:
                w = _scale_groups(w, S, Z, offs_n, n_ok, k0 // GROUP, NG, stride_sn,
                                  BLOCK_N, BLOCK_K // GROUP, GROUP, HAS_ZERO)
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mac(acc, x, w, USE_DOT, PRECISION)
        else:
            # packed column c = k0 / 2 + i holds k_lo = 32 (c // 16) + c % 16 and k_lo + 16
            offs_c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            c_ok = offs_c < K // 2
            p = tl.load(w_rows + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0).to(tl.int32)
            lo = (p & 0xF).to(tl.float32) - 8.0
            hi = ((p >> 4) & 0xF).to(tl.float32) - 8.0
            # a group of GROUP weights spans GROUP / 2 consecutive packed columns
            lo = _scale_groups(lo, S, Z, offs_n, n_ok, k0 // GROUP, NG, stride_sn,
                               BLOCK_N, BLOCK_K // GROUP, GROUP // 2, HAS_ZERO)
            hi = _scale_groups(hi, S, Z, offs_n, n_ok, k0 // GROUP, NG, stride_sn,
                               BLOCK_N, BLOCK_K // GROUP, GROUP // 2, HAS_ZERO)
            k_lo = (offs_c // 16) * 32 + offs_c % 16
            x_ok = m_ok[:, None] & c_ok[None, :]
            x_lo = tl.load(x_rows + k_lo[None, :], mask=x_ok, other=0.0)
            x_hi = tl.load(x_rows + (k_lo + 16)[None, :], mask=x_ok, other=0.0)
            acc = _mac(acc, x_lo, lo, USE_DOT, PRECISION)
            acc = _mac(acc, x_hi, hi, USE_DOT, PRECISION)
    if GROUP == 0:  # per output channel: one scale per column of the accumulator
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_ZERO", "USE_DOT", "PRECISION", "BLOCK_M"]

# GEMV: few rows, so register use is BLOCK_M x BLOCK_N x BLOCK_K fp32 products per chunk; narrow
# n tiles also give the small layers of GPT-2 (N = 768) enough programs to fill the SMs.
GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(8, 256, 4, 3), (16, 256, 4, 3), (16, 128, 4, 4), (32, 128, 4, 3),
                                     (32, 256, 8, 3), (8, 512, 8, 2), (64, 128, 8, 3)]]
GEMM_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(32, 128, 4, 4), (64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3),
                                     (128, 128, 8, 3), (32, 256, 4, 3)]]

_GEMV = triton.autotune(
    configs=configs(gpu=GEMV_CONFIGS,
                    interp=[triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=1, num_stages=1)]),
    key=_KEY,
)(_quant_linear_kernel)

_GEMM = triton.autotune(
    configs=configs(gpu=GEMM_CONFIGS,
                    interp=[triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1)]),
    key=_KEY,
)(_quant_linear_kernel)


# ----------------------------------------------------------------------------- launchers


def _check(x, qweight, scale, zero, bias, bits, group_size) -> tuple[int, int]:
    """Validate a call; return (N, K). Errors name the argument, the expected and the got."""
    fn = "quantized_linear"
    check_cuda_or_interpret(fn, x, qweight, scale, zero, bias)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if bits not in (4, 8):
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits!r}")
    if group_size is None and bits == 4:
        raise ValueError(f"{fn}: group_size must be one of {GROUP_SIZES} for bits=4, got None")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size must be None (per channel) or one of {GROUP_SIZES}, got {group_size!r}")
    if zero is not None and bits != 4:
        raise ValueError(f"{fn}: zero is an int4 option (bits=4), got bits={bits}")
    want_q = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want_q or qweight.dim() != 2:
        raise TypeError(f"{fn}: qweight must be a 2-D {want_q} tensor for bits={bits}, "
                        f"got {qweight.dtype} of shape {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * (8 // bits)
    if x.shape[-1] != K:
        raise ValueError(f"{fn}: x must have K = {K} features (qweight {tuple(qweight.shape)}, bits={bits}), "
                         f"got x of shape {tuple(x.shape)}")
    if group_size is not None and K % group_size:
        raise ValueError(f"{fn}: K = {K} is not a multiple of group_size {group_size}")
    if bits == 4 and K % INT4_BLOCK:
        raise ValueError(f"{fn}: int4 needs K % {INT4_BLOCK} == 0, got K = {K}")
    shape_s = (N,) if group_size is None else (N, K // group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        if t is not None and (tuple(t.shape) != shape_s or not t.is_floating_point()):
            raise ValueError(f"{fn}: {name} must be a float tensor of shape {shape_s}, "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"{fn}: bias must be ({N},) {x.dtype}, got {bias.dtype} of shape {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")
    return N, K


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@triton_op("gptfast_triton::quantized_linear", mutates_args=())
def quantized_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    bias: torch.Tensor | None, bits: int, group_size: int,
) -> torch.Tensor:
    """(M, N) in x's dtype for x (M, K); group_size 0 = per output channel. See `quantized_linear`."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    _launch(x, qweight, scale, zero, bias, y, bits, group_size)
    return y


def _launch(x, qweight, scale, zero, bias, y, bits: int, group_size: int, config: triton.Config | None = None):
    """Run the kernel for x (M, K) into y (M, N): autotuned, or with an explicit `config` (one of
    GEMV_CONFIGS / GEMM_CONFIGS; tests run every GPU config's tiling in the interpreter)."""
    M, K = x.shape
    N = qweight.shape[0]
    x, qweight = _unit_last(x), _unit_last(qweight)
    scale = scale.contiguous()  # (N,) or (N, K/g): zero shares its row stride
    zero = None if zero is None else zero.contiguous()
    use_dot = M > GEMV_MAX_M
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if not use_dot:
        block_m = triton.next_power_of_2(M)
    kernel, meta = (_GEMM if use_dot else _GEMV), {}
    if config is not None:
        kernel, meta = _quant_linear_kernel, dict(config.kwargs, num_warps=config.num_warps,
                                                  num_stages=1 if INTERPRET else config.num_stages)

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(M, block_m))

    wrap_triton(kernel)[grid](
        x, qweight, scale, zero, bias, y, M, N, K, bucket(M),
        x.stride(0), qweight.stride(0), scale.stride(0),
        BITS=bits, GROUP=group_size, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        USE_DOT=use_dot, PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, **meta,
    )


@quantized_linear_op.register_fake
def _(x, qweight, scale, zero, bias, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def quantized_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, *, bits: int, group_size: int | None,
) -> torch.Tensor:
    """x W^T + bias with W quantized (formats: gptfast.ops.quant); inference only (no autograd).

    x: (..., K) fp16 / bf16 / fp32; qweight: (N, K) int8 (bits=8) or (N, K/2) uint8 packed int4
    (bits=4, K % 32 == 0); scale: (N,) per output channel (bits=8, group_size=None) or (N, K/g)
    per group (group_size g in 32 / 64 / 128); zero: (N, K/g) or None (int4 only); bias: (N,) in
    x's dtype or None. CUDA tensors (CPU under TRITON_INTERPRET=1). Returns (..., N) in x's dtype.
    """
    _check(x, qweight, scale, zero, bias, bits, group_size)
    N, K = qweight.shape[0], x.shape[-1]
    y = torch.ops.gptfast_triton.quantized_linear(x.reshape(-1, K), qweight, scale, zero, bias, bits,
                                                  0 if group_size is None else group_size)
    return y.view(*x.shape[:-1], N)


__all__ = ["GEMV_MAX_M", "SUPPORTED_DTYPES", "quantized_linear"]
