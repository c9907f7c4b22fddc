"""The `native` backend: gptfast's C++ (CPU) and CUDA kernels, registered with `torch.library`.

The package, by job:
- `_loader`: finds or JIT-builds the library (csrc/), once per process, lazily; `availability`.
- `_meta`: the fake (meta) kernels and autograd, registered once the library is loaded.
- `attention`: the attention wrappers (`causal_attention`, `decode_attention`) and their limits.
- here: the backend protocol (`availability`, `unsupported`) and the op wrappers, with exactly
  the signatures of `gptfast/ops/reference.py`, plus the native-only ops `skinny_linear` and
  `decode_step` (the fused CPU decoding step, weights by name in a `DecodeStepWeights`).

Importing this package builds nothing; the first op call (or `availability`) loads the library.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from gptfast.ops import reference as _reference
from gptfast.ops.native import _loader
from gptfast.ops.native._loader import (  # noqa: F401  (public names of the backend)
    KEEP_BUILDS,
    _has_kernel,
    availability,
    ensure_loaded,
    ext_dir,
    load_extension,
    prune_builds,
)
from gptfast.ops.native import attention as _attention
from gptfast.ops.native.attention import causal_attention, decode_attention  # noqa: F401

_ATTENTION_OPS = ("causal_attention", "decode_attention")
# dtypes the CPU kernels of layer_norm / gelu_mlp accept (fp64 for gradcheck). `sample` takes any
# floating dtype: the wrapper casts to fp32 first, exactly as the reference does.
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float_dtype() in csrc/cuda/bindings.cpp


# ----------------------------------------------------------------------------- backend protocol


def unsupported(op: str, device_type: str = "cpu", dtype: torch.dtype | None = None, **call) -> str | None:
    """None if this call can run natively, else why not (op missing for the device, dtype, ...)."""
    lib_op = _loader._OP_KERNEL.get(op)
    if lib_op is None and op != "linear":
        return f"{op} has no native kernel"
    if not _loader._STATE.loaded:
        reason = availability(device_type)
        if reason is not None:
            return reason
    if op == "linear":  # skinny_linear where it pays, else F.linear (see `linear`): any call runs
        return None
    if not _has_kernel(lib_op, device_type):
        return f"no native {device_type.upper()} kernel registered for {op}"
    if op in ("layer_norm", "gelu_mlp") and device_type == "cpu" and dtype is not None and dtype not in _CPU_DTYPES:
        return f"native CPU {op} supports float32 and float64, got {dtype}"
    if (op in ("layer_norm", "gelu_mlp", "sample", "quantized_linear") and device_type == "cuda" and dtype is not None
            and dtype not in _CUDA_DTYPES):
        return f"native CUDA {op} supports float32, float16 and bfloat16, got {dtype}"
    if op in _ATTENTION_OPS:
        return _attention.unsupported(op, device_type=device_type, dtype=dtype, **call)
    if op == "quantized_linear" and device_type == "cpu":
        if dtype is not None and dtype != torch.float32:
            return f"native CPU quantized_linear takes float32 x, got {dtype}"
    return None


# ----------------------------------------------------------------------------- ops


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dim; see `reference.layer_norm`. x: (..., N); weight, bias: (N,) or None."""
    ensure_loaded()
    N = x.shape[-1]
    y, _mean, _rstd = torch.ops.gptfast.layer_norm_fwd(x.reshape(-1, N), weight, bias, float(eps))  # (M, N)
    return y.view(x.shape)


def gelu_mlp(
    x: torch.Tensor,
    w_fc: torch.Tensor,
    b_fc: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    activation: str = "gelu_tanh",
) -> torch.Tensor:
    """gelu(x w_fc^T + b_fc) w_proj^T + b_proj; see `reference.gelu_mlp`. x: (..., C).
    activation "gelu" runs the kernels with exact=True (erf GELU), "gelu_tanh" with exact=False.

    w_fc / w_proj may be bfloat16 with float32 x (weight-only bf16): the CPU inference kernel
    reads them as they are (widened exactly, fp32 math); the training forward and the CUDA
    kernels get fp32 copies (`.to(x.dtype)`, exact), which compute the same thing.
    """
    ensure_loaded()
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    exact = activation == "gelu"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_fc, b_fc, w_proj, b_proj)):
        w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)  # no-ops unless weight-only bf16
        y, _pre = torch.ops.gptfast.gelu_mlp_fwd(x2, w_fc, b_fc, w_proj, b_proj, exact)  # pre saved for backward
    else:  # inference: no pre to keep, GELU in place
        if not x.is_cpu:
            w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)
        y = torch.ops.gptfast.gelu_mlp_infer(x2, w_fc, b_fc, w_proj, b_proj, exact)
    return y.view(*x.shape[:-1], w_proj.shape[0])


# The named option that changes the arithmetic of bf16 weights (read at each call, by the C++
# kernels too): with "1", on a CPU with avx512_bf16, activations are rounded to bf16 and the
# products run through vdpbf16ps with fp32 accumulation (llama.cpp's bf16 arithmetic), for
# decoding (csrc/cpu/skinny_linear.cpp) and the prompt pass (linear and gelu_mlp, any row count).
BF16_DOT_ENV = "GPTFAST_BF16_DOT"

# Largest M for which `skinny_linear` beats torch.mm / addmm on CPU fp32 (measured; the C++ side
# uses the same number, kSkinnyMaxM in csrc/cpu/skinny_linear.h, inside gelu_mlp's forward).
SKINNY_MAX_M = 16


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N,) -> (M, N): `F.linear` for a few rows (CPU, fp32/fp64).

    Streams the weight once whatever M is (batched decoding); weight in nn.Linear layout, inner
    stride 1 (anything else is copied first). On CPU the weight may also be bf16 with fp32 x
    (weight-only bf16: widened exactly, accumulated in fp32; output fp32). Differentiable
    (backward with ATen matmuls).
    """
    ensure_loaded()
    return torch.ops.gptfast.skinny_linear(x, weight, bias)


_SKINNY_DEVICES: dict[str, bool] = {}  # device type -> has a skinny_linear kernel (fixed once loaded)


def skinny_linear_available(device_type: str = "cpu") -> bool:
    """Whether the loaded library has a `skinny_linear` kernel for the device (False if not built)."""
    if device_type in _SKINNY_DEVICES and _loader._STATE.loaded:
        return _SKINNY_DEVICES[device_type]
    try:
        ensure_loaded()
    except RuntimeError:
        return False
    ok = device_type in ("cpu", "cuda") and _has_kernel("skinny_linear", device_type)
    _SKINNY_DEVICES[device_type] = ok
    return ok


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias -> (..., N); see `reference.linear`.

    A few rows (M = x.numel() // K <= SKINNY_MAX_M, batched decoding) of fp32/fp64 x run
    `skinny_linear` where the library has it for the device (CPU today: it streams the weight once
    and reads bf16 weights itself); anything else is `F.linear` on the widened weight (cuBLAS /
    oneDNN GEMMs are the right kernels for many rows). Differentiable either way.
    """
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    many = M > SKINNY_MAX_M and x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and x.is_cpu
    if many and os.environ.get(BF16_DOT_ENV) == "1" and skinny_linear_available("cpu"):
        # The opt-in bf16 dot products serve many rows too (the prompt pass): ~2x the GEMM on the
        # widened weight; the C++ op checks the CPU (no avx512_bf16: that GEMM, same numbers).
        y = torch.ops.gptfast.skinny_linear(x.reshape(M, K), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    if 1 <= M <= SKINNY_MAX_M and x.dtype in _CPU_DTYPES and skinny_linear_available(x.device.type):
        y = torch.ops.gptfast.skinny_linear(x.reshape(M, K), weight, bias)  # (M, N)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype), bias)


def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int | None,
    act_int8: bool = False,
) -> torch.Tensor:
    """x (..., K) @ w^T + bias -> (..., N), w the dequantized weight; see `reference.quantized_linear`
    and gptfast/ops/quant.py for the formats. CPU (fp32 x; csrc/cpu/quant_linear.cpp): up to
    SKINNY_MAX_M rows the weight is streamed once and dequantized in registers (AVX-512 or 8-lane
    kernel by CPUID); more rows multiply ~1 MB dequantized tiles with sgemm. act_int8 (int8
    formats): activations quantized per row and 32-block to int8 and integer dot products
    (llama.cpp's q8_0 x q8_0; AVX-512 VNNI where the CPU has it, else an emulation with the same
    bits); int4 formats ignore it (weight-only, as the other backends). Inference only (no autograd)."""
    ensure_loaded()
    K = x.shape[-1]
    y = torch.ops.gptfast.quantized_linear(
        x.reshape(-1, K), qweight, scale, zero, bias, int(bits), 0 if group_size is None else int(group_size),
        bool(act_int8) and int(bits) == 8 and x.is_cpu,
    )
    return y.view(*x.shape[:-1], qweight.shape[0])


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    uniform: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64, token-for-token as `reference.sample`
    given the same draws: `uniform` ((B,) fp32 in [0, 1), None for temperature 0) comes from the
    dispatch layer (`gptfast.ops.draw_uniform`); a direct call may pass a generator instead."""
    ensure_loaded()
    uniform = _reference.as_uniform(logits, temperature, uniform, generator)
    if logits.dtype not in _CPU_DTYPES:
        logits = logits.float()  # exact for fp16/bf16; the reference works in fp32 as well
    if uniform is None:  # temperature 0: argmax, the kernel does not read it
        uniform = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    return torch.ops.gptfast.sample(
        logits,
        float(temperature),
        0 if top_k is None else int(top_k),
        1.0 if top_p is None else float(top_p),
        uniform,
    )


# ----------------------------------------------------------------------------- fused decode step


@dataclasses.dataclass
class DecodeStepWeights:
    """A GPT-2's weights for `decode_step`, by name: one list per kind, one entry per block.

    Matrices in nn.Linear's (out, in) layout, fp32 or bfloat16 (weight-only bf16; w_fc and w_proj
    of a block share a dtype): w_qkv (3C, C), w_o (C, C), w_fc (F, C), w_proj (C, F), w_head (V, C),
    wte (V, C). Vectors fp32 or None (absent bias / LayerNorm affine): ln*_w, ln*_b, lnf_w, lnf_b
    (C,), b_qkv (3C,), b_o (C,), b_fc (F,), b_proj (C,). wpe (block_size, C) fp32. eps: every
    LayerNorm's; exact_gelu: the erf GELU instead of the tanh one. Shapes and dtypes are checked
    by the op on every call (C++); the list lengths and the None matrices here, at construction.
    """

    wte: torch.Tensor
    wpe: torch.Tensor
    ln1_w: list[torch.Tensor | None]
    ln1_b: list[torch.Tensor | None]
    w_qkv: list[torch.Tensor]
    b_qkv: list[torch.Tensor | None]
    w_o: list[torch.Tensor]
    b_o: list[torch.Tensor | None]
    ln2_w: list[torch.Tensor | None]
    ln2_b: list[torch.Tensor | None]
    w_fc: list[torch.Tensor]
    b_fc: list[torch.Tensor | None]
    w_proj: list[torch.Tensor]
    b_proj: list[torch.Tensor | None]
    lnf_w: torch.Tensor | None
    lnf_b: torch.Tensor | None
    w_head: torch.Tensor
    eps: float
    exact_gelu: bool = False
    # Quantized matrices (issue #20): bits 8 / 4 = w_qkv .. w_proj are quantized_linear qweights of
    # one format (bits, group_size: None = per channel), with one scale per layer in s_* and zeros
    # in z_* (empty = none); bits 0 = float matrices, s_* / z_* empty. The head has its own format
    # (head_bits 0 = a float w_head), the token embedding too (wte_bits 0 = a float wte; else wte is
    # a qweight, e.g. the tied quantized head's, read as QuantEmbedding does). act_int8:
    # quantized_linear's option, applied to the int8 matrices.
    s_qkv: list[torch.Tensor] = dataclasses.field(default_factory=list)
    z_qkv: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    s_o: list[torch.Tensor] = dataclasses.field(default_factory=list)
    z_o: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    s_fc: list[torch.Tensor] = dataclasses.field(default_factory=list)
    z_fc: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    s_proj: list[torch.Tensor] = dataclasses.field(default_factory=list)
    z_proj: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    s_head: torch.Tensor | None = None
    z_head: torch.Tensor | None = None
    bits: int = 0
    group_size: int | None = None
    head_bits: int = 0
    head_group_size: int | None = None
    s_wte: torch.Tensor | None = None
    z_wte: torch.Tensor | None = None
    wte_bits: int = 0
    wte_group_size: int | None = None
    act_int8: bool = False

    LISTS = ("ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_w", "ln2_b", "w_fc", "b_fc", "w_proj", "b_proj")
    MATRICES = ("w_qkv", "w_o", "w_fc", "w_proj")
    QUANT_LISTS = ("s_qkv", "z_qkv", "s_o", "z_o", "s_fc", "z_fc", "s_proj", "z_proj")

    def __post_init__(self) -> None:
        for name in self.LISTS:
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise TypeError(
                    f"DecodeStepWeights: {name} must be a list (one entry per layer), got {type(v).__name__}"
                )
            setattr(self, name, list(v))
        lengths = {name: len(getattr(self, name)) for name in self.LISTS}
        if len(set(lengths.values())) > 1:  # name the odd ones out (against the most common length)
            counts = list(lengths.values())
            n = max(counts, key=counts.count)
            odd = [name for name, k in lengths.items() if k != n]
            raise ValueError(f"DecodeStepWeights: {', '.join(odd)} must hold one entry per layer like the other "
                             f"lists ({n}), got {', '.join(str(lengths[name]) for name in odd)}")
        n = len(self.w_qkv)
        for name in self.QUANT_LISTS:
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"DecodeStepWeights: {name} must be a list, got {type(v).__name__}")
            setattr(self, name, list(v))
            if self.bits == 0 and v:
                raise ValueError(f"DecodeStepWeights: {name} must be empty for float matrices (bits=0), "
                                 f"got {len(v)} entries")
            if self.bits != 0 and (name[0] == "s" or v) and len(v) != n:
                raise ValueError(f"DecodeStepWeights: {name} must hold one entry per layer ({n}) for bits="
                                 f"{self.bits}, got {len(v)}")
        for name in self.MATRICES:
            for i, t in enumerate(getattr(self, name)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"DecodeStepWeights: {name}[{i}] (layer {i} {name}) must be a tensor, "
                                     f"got {type(t).__name__}")
        for name in ("wte", "wpe", "w_head"):
            if not isinstance(getattr(self, name), torch.Tensor):
                got = type(getattr(self, name)).__name__
                raise ValueError(f"DecodeStepWeights: {name} must be a tensor, got {got}")

    @property
    def n_layer(self) -> int:
        return len(self.w_qkv)


def decode_step(tokens: torch.Tensor, pos: torch.Tensor, weights: DecodeStepWeights, k_cache: list[torch.Tensor],
                v_cache: list[torch.Tensor]) -> torch.Tensor:
    """One GPT-2 decoding step in one native CPU op (no Python between kernels): tokens, pos (B,)
    int64 -> logits (B, V) fp32, writing each row's K/V into `k_cache` / `v_cache` (one (B, H,
    T_max, D) fp32 contiguous tensor per block) at pos. See csrc/cpu/decode_step.cpp for what it
    computes; every input is checked before any cache is written (RuntimeError naming it)."""
    ensure_loaded()
    w = weights
    return torch.ops.gptfast.decode_step(
        tokens, pos, w.wte, w.wpe, w.ln1_w, w.ln1_b, w.w_qkv, w.b_qkv, w.w_o, w.b_o, w.ln2_w, w.ln2_b,
        w.w_fc, w.b_fc, w.w_proj, w.b_proj, w.lnf_w, w.lnf_b, w.w_head, k_cache, v_cache,
        w.s_qkv, w.z_qkv, w.s_o, w.z_o, w.s_fc, w.z_fc, w.s_proj, w.z_proj, w.s_head, w.z_head, w.s_wte, w.z_wte,
        float(w.eps), bool(w.exact_gelu), int(w.bits), int(w.group_size or 0), int(w.head_bits),
        int(w.head_group_size or 0), int(w.wte_bits), int(w.wte_group_size or 0), bool(w.act_int8),
    )


def decode_step_available() -> bool:
    """Whether the loaded library has the fused CPU decode step (False if not built)."""
    try:
        ensure_loaded()
    except RuntimeError:
        return False
    return _has_kernel("decode_step", "cpu")
