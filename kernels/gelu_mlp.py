"""GPT-2's MLP, gelu(x W_fc^T + b_fc) W_proj^T + b_proj, with bias and GELU fused into matmuls.

gelu is GPT-2's tanh approximation (activation="gelu_tanh", the default) or the exact erf GELU
(activation="gelu": x Phi(x), torch.nn.GELU(), nanoGPT); the EXACT constexpr picks it in the
epilogues below.

Algorithm: one tiled matmul kernel (Triton tutorial 03 "Matrix Multiplication": BLOCK_M x BLOCK_N
output tiles, a K loop accumulating in fp32, grouped ("super-grouping") tile order for L2 reuse;
our own code) with a choice of epilogue applied to the fp32 accumulator before the single store:

- EPILOGUE_GELU: + bias, store the pre-activation H and the activation G = gelu_tanh(H). The
  c_fc matmul; H is kept for the backward's GELU derivative, G feeds c_proj and its weight grad.
  Storing both costs 2 x M x F elements, the same as PyTorch eager's saved tensors; recomputing G
  from H inside the dW_proj matmul would save M x F elements at the price of a GELU per operand
  load in a K-loop (F/BLOCK_K times per element), which we judged not worth it.
- EPILOGUE_BIAS: + bias. The c_proj matmul.
- EPILOGUE_DGELU: multiply by gelu_tanh'(H) loaded from the saved pre-activation. This fuses the
  GELU backward into the matmul that produces dH = (dY W_proj) * gelu'(H), so the (M, F) gradient
  dG is never written and re-read (the alternative, a separate elementwise kernel after a torch
  matmul, moves 3 extra M x F tensors through memory).
- EPILOGUE_NONE: the plain products dX = dH W_fc, dW_fc = dH^T X, dW_proj = dY^T G.

Both operands are addressed through explicit strides, so transposed views (W^T, dY^T) cost no
copies. Bias gradients are column sums done with torch (fp32 accumulate), a small fraction of the
backward's traffic.

GELU(tanh) is written as x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3): the identity
0.5 (1 + tanh z) = sigmoid(2 z) avoids a tanh intrinsic that the interpreter lacks. The exact
GELU uses tl.math.erf (libdevice erff on CUDA; the interpreter has it too):
Phi(x) = (1 + erf(x / sqrt 2)) / 2, gelu' = Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import bucket, check_cuda_or_interpret, configs, dot_precision

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPILOGUE_NONE, EPILOGUE_BIAS, EPILOGUE_GELU, EPILOGUE_DGELU = 0, 1, 2, 3


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _gelu_parts(h, EXACT: tl.constexpr):
    """(gelu(h), d gelu / dh) for fp32 h: the exact erf GELU if EXACT, else gelu_tanh."""
    if EXACT:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # Phi(h)
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # phi(h) = exp(-h^2/2) / sqrt(2 pi)
        return h * cdf, cdf + h * pdf
    else:
        c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        z = c * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(2.0 * z)  # = 0.5 * (1 + tanh(z))
        dz = c * (1.0 + 3.0 * 0.044715 * h * h)
        # 1 - s as sigmoid(-2z): the subtraction cancels where s -> 1 (h >~ 3), which cost gelu'
        # ~3x PyTorch's fp32 error there
        return h * s, s + h * (2.0 * s * tl.sigmoid(-2.0 * z)) * dz


_MM_CONFIGS = configs(
    gpu=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
        ]
    ],
    interp=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)],
)


@triton.autotune(configs=_MM_CONFIGS, key=["M_BUCKET", "N", "K", "EPILOGUE", "PRECISION", "EXACT"])
@triton.jit
def _matmul_kernel(
    A, B,                    # A (M, K), B (K, N), any strides
    C,                       # (M, N) output, contiguous
    BIAS,                    # (N,) for EPILOGUE_BIAS / EPILOGUE_GELU
    H,                       # (M, N) contiguous: pre-activation, stored (GELU) or loaded (DGELU)
    M, N, K,
    M_BUCKET,                # autotune key only
    stride_am, stride_ak,
    stride_bk, stride_bn,
    EPILOGUE: tl.constexpr,
    EXACT: tl.constexpr,     # GELU epilogues: exact erf GELU (else tanh approximation)
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive programs share a column of B tiles, so B stays in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if EPILOGUE == 2:  # GELU: keep the pre-activation for the backward
        tl.store(H + c_offs, acc.to(H.dtype.element_ty), mask=mask)
        acc, _ = _gelu_parts(acc, EXACT)
    if EPILOGUE == 3:  # DGELU: dH = dG * gelu'(H)
        h = tl.load(H + c_offs, mask=mask, other=0.0).to(tl.float32)
        _, dgelu = _gelu_parts(h, EXACT)
        acc = acc * dgelu
    tl.store(C + c_offs, acc.to(C.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
            epilogue: int = EPILOGUE_NONE, h: torch.Tensor | None = None,
            exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = epilogue(a @ b (+ bias)) for a (M, K), b (K, N) of any strides; returns (C, H or None).

    EPILOGUE_GELU allocates and returns the pre-activation H; EPILOGUE_DGELU reads `h`.
    exact: the GELU epilogues use the exact erf GELU instead of the tanh approximation.
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if epilogue == EPILOGUE_GELU:
        h = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c, h
    if K == 0:  # empty reduction: the kernel's K loop would not run; keep the epilogue exact
        acc = torch.zeros((M, N), dtype=torch.float32, device=a.device)
        if bias is not None:
            acc = acc + bias.float()
        if epilogue == EPILOGUE_GELU:
            h.copy_(acc)
            acc = torch.nn.functional.gelu(acc, approximate="none" if exact else "tanh")
        elif epilogue == EPILOGUE_DGELU:
            acc = acc * 0.0
        c.copy_(acc)
        return c, h

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    wrap_triton(_matmul_kernel)[grid](
        a, b, c, bias, h, M, N, K, bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        EPILOGUE=epilogue, EXACT=bool(exact), HAS_BIAS=bias is not None, PRECISION=dot_precision(a.dtype),
    )
    return c, h


def _check(x, w_fc, b_fc, w_proj, b_proj) -> None:
    check_cuda_or_interpret("gelu_mlp", x, w_fc, b_fc, w_proj, b_proj)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gelu_mlp: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    C = x.shape[-1]
    if w_fc.dim() != 2 or w_fc.shape[1] != C:
        raise ValueError(f"gelu_mlp: w_fc must have shape (F, {C}), got {tuple(w_fc.shape)}")
    if w_proj.dim() != 2 or w_proj.shape[1] != w_fc.shape[0]:
        raise ValueError(f"gelu_mlp: w_proj must have shape (C_out, {w_fc.shape[0]}), got {tuple(w_proj.shape)}")
    for name, t in (("w_fc", w_fc), ("b_fc", b_fc), ("w_proj", w_proj), ("b_proj", b_proj)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"gelu_mlp: {name} must have x's dtype {x.dtype}, got {t.dtype}")


@triton_op("gptfast_triton::gelu_mlp_fwd", mutates_args=())
def gelu_mlp_fwd(
    x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
    b_proj: torch.Tensor | None, exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, C_out), H (M, F) pre-activation, G (M, F) activation) for x flattened to (M, C)."""
    x2 = x.reshape(-1, x.shape[-1])
    g, h = _matmul(x2, w_fc.t(), b_fc, EPILOGUE_GELU, exact=exact)  # (M, F)
    y, _ = _matmul(g, w_proj.t(), b_proj, EPILOGUE_BIAS if b_proj is not None else EPILOGUE_NONE)
    return y, h, g


@gelu_mlp_fwd.register_fake
def _(x, w_fc, b_fc, w_proj, b_proj, exact=False):
    M = x.numel() // x.shape[-1]
    F_ = w_fc.shape[0]
    return x.new_empty((M, w_proj.shape[0])), x.new_empty((M, F_)), x.new_empty((M, F_))


@triton_op("gptfast_triton::gelu_mlp_bwd", mutates_args=())
def gelu_mlp_bwd(
    dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, h: torch.Tensor,
    g: torch.Tensor, exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, C), dW_fc (F, C), db_fc (F,), dW_proj (C_out, F), db_proj (C_out,)); dy is (M, C_out)."""
    x2 = x.reshape(-1, x.shape[-1])
    dh, _ = _matmul(dy, w_proj, None, EPILOGUE_DGELU, h, exact=exact)  # (M, F) = (dY W_proj) * gelu'(H)
    dx, _ = _matmul(dh, w_fc)                              # (M, C)
    dw_fc, _ = _matmul(dh.t(), x2)                          # (F, C)
    dw_proj, _ = _matmul(dy.t(), g)                         # (C_out, F)
    db_fc = dh.sum(0, dtype=torch.float32).to(x.dtype)
    db_proj = dy.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dw_fc, db_fc, dw_proj, db_proj


@gelu_mlp_bwd.register_fake
def _(dy, x, w_fc, w_proj, h, g, exact=False):
    M = x.numel() // x.shape[-1]
    return (x.new_empty((M, x.shape[-1])), w_fc.new_empty(w_fc.shape), w_fc.new_empty((w_fc.shape[0],)),
            w_proj.new_empty(w_proj.shape), w_proj.new_empty((w_proj.shape[0],)))


# ----------------------------------------------------------------------------- autograd + public


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj, exact):
        y, h, g = torch.ops.gptfast_triton.gelu_mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, exact)
        ctx.save_for_backward(x, w_fc, w_proj, h, g)
        ctx.has_b = (b_fc is not None, b_proj is not None)
        ctx.exact = exact
        return y.view(*x.shape[:-1], w_proj.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w_fc, w_proj, h, g = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dw_fc, db_fc, dw_proj, db_proj = torch.ops.gptfast_triton.gelu_mlp_bwd(dy2, x, w_fc, w_proj, h, g,
                                                                                   ctx.exact)
        return (dx.view(x.shape), dw_fc, db_fc if ctx.has_b[0] else None, dw_proj,
                db_proj if ctx.has_b[1] else None, None)


def gelu_mlp(
    x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
    b_proj: torch.Tensor | None, activation: str = "gelu_tanh",
) -> torch.Tensor:
    """gelu(x w_fc^T + b_fc) w_proj^T + b_proj with fused epilogues (activation: "gelu_tanh" or
    "gelu", the exact erf GELU).

    x: (..., C); w_fc: (F, C); b_fc: (F,) or None; w_proj: (C_out, F); b_proj: (C_out,) or None;
    all fp16/bf16/fp32, one dtype, CUDA (CPU under TRITON_INTERPRET=1). Returns (..., C_out);
    differentiable w.r.t. every tensor argument.
    """
    _check(x, w_fc, b_fc, w_proj, b_proj)
    if activation not in ("gelu_tanh", "gelu"):
        raise ValueError(f"gelu_mlp: activation must be 'gelu_tanh' or 'gelu', got {activation!r}")
    return _GeluMLP.apply(x, w_fc, b_fc, w_proj, b_proj, activation == "gelu")
