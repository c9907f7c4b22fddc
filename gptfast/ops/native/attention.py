"""The `native` backend's attention ops: wrappers over gptfast's C++ CPU kernels.

- `causal_attention` calls `torch.ops.gptfast.causal_attention_fwd` (csrc/cpu/attention.cpp, a
  FlashAttention-2 style tiled forward that also returns the row log-sum-exp); its autograd
  (backward = `causal_attention_bwd`, which recomputes the probabilities from q, k and lse) and the
  fake kernels are registered in `gptfast/ops/native/_meta.py` when the library loads.
- `decode_attention` calls `torch.ops.gptfast.decode_attention` (csrc/cpu/decode_attention.cpp,
  split-K "flash-decoding" over the cache length).

The C++ kernels take fp32 and fp64; fp16 / bf16 inputs are computed in fp32 and cast back, which
is exactly what the reference does (it accumulates half types in fp32). Dropout is not
implemented natively: `unsupported` says so, so `auto` falls back and `backend="native"` raises.
These functions are re-exported by `gptfast.ops.native` (the backend package); call them through
`gptfast.ops`, which validates the arguments. This module imports the loader only (not the
package), so there is no import circle.
"""

from __future__ import annotations

import math

import torch

from gptfast.ops.native._loader import ensure_loaded

_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the C++ kernels take
_CAST_DTYPES = (torch.float16, torch.bfloat16)  # computed in fp32 on CPU, like the reference
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (16, 32, 64, 128)  # attn_head_dim_supported in csrc/cuda/launch.h
CUDA_DECODE_MAX_TQ = 4  # kDecodeMaxTq in csrc/cuda/launch.h
MAX_HEAD_DIM = 256  # kMaxHeadDim in csrc/cpu/attention.cpp


def unsupported(op: str, device_type: str = "cpu", dtype: torch.dtype | None = None, **call) -> str | None:
    """Backend protocol (called by `native.unsupported` for the attention ops): None or the reason."""
    if op == "causal_attention" and call.get("dropout_p", 0.0) > 0.0:
        return "native causal_attention has no dropout (dropout_p > 0); use the torch or reference backend"
    if device_type == "cuda":
        # Mirrors the TORCH_CHECKs of csrc/cuda/bindings.cpp, so `auto` falls back instead of failing.
        if dtype is not None and dtype not in _CUDA_DTYPES:
            return f"native CUDA {op} supports float32/float16/bfloat16, got {dtype}"
        head_dim = call.get("head_dim")
        if head_dim is not None and head_dim not in CUDA_HEAD_DIMS:
            return f"native CUDA {op} supports head dims {CUDA_HEAD_DIMS}, got {head_dim}"
        n_query = call.get("n_query")
        if op == "decode_attention" and n_query is not None and n_query > CUDA_DECODE_MAX_TQ:
            return f"native CUDA decode_attention takes 1..{CUDA_DECODE_MAX_TQ} query tokens, got {n_query}"
        return None
    if device_type != "cpu":
        return f"no native {op} for device type {device_type!r}"
    if dtype is not None and dtype not in _KERNEL_DTYPES + _CAST_DTYPES:
        return f"native CPU {op} supports float32/float64 (float16/bfloat16 via float32), got {dtype}"
    head_dim = call.get("head_dim")
    if head_dim is not None and not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"native CPU {op} supports head dims 1..{MAX_HEAD_DIM}, got {head_dim}"
    return None


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The CPU kernels compute fp16/bf16 in fp32; the CUDA kernels take them as they are."""
    return torch.float32 if t.dtype in _CAST_DTYPES and t.device.type == "cpu" else t.dtype


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v; see `reference.causal_attention`.

    q, k, v: (B, H, T, D), one dtype (fp32/fp64 natively; fp16/bf16 computed in fp32), any strides
    (the kernel packs its tiles itself, so transposed views of (B, T, H, D) cost no copy here).
    scale: defaults to 1/sqrt(D). dropout_p must be 0. Returns (B, H, T, D) in q's dtype,
    contiguous; differentiable w.r.t. q, k, v.
    """
    ensure_loaded()
    if dropout_p > 0.0:
        raise ValueError(f"causal_attention: the native backend has no dropout, got dropout_p={dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dt = _kernel_dtype(q)
    out, _lse = torch.ops.gptfast.causal_attention_fwd(q.to(dt), k.to(dt), v.to(dt), scale)  # (B, H, T, D)
    return out.to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the Tq newest tokens against a KV cache; see `reference.decode_attention`.

    q: (B, H, Tq, D), Tq >= 1; k_cache, v_cache: (B, H, T_max, D) in q's dtype (rows with
    inner stride 1 are read in place, whatever the other strides); cache_lens: (B,) int32/int64,
    Tq <= cache_lens[b] <= T_max. Returns (B, H, Tq, D) in q's dtype. Inference only (no autograd).
    """
    ensure_loaded()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dt = _kernel_dtype(q)
    if dt == q.dtype:  # the decode loop's case: skip four no-op `.to` dispatches (~1-3 us each)
        if cache_lens.dtype != torch.int64:
            cache_lens = cache_lens.to(torch.int64)
        return torch.ops.gptfast.decode_attention(q, k_cache, v_cache, cache_lens, scale)  # (B, H, Tq, D)
    out = torch.ops.gptfast.decode_attention(
        q.to(dt), k_cache.to(dt), v_cache.to(dt), cache_lens.to(torch.int64), scale
    )
    return out.to(q.dtype)
