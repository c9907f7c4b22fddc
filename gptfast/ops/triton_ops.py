"""The `triton` backend: adapters from the dispatch layer to the Triton kernels in `kernels/`.

Available on CUDA when triton imports; on CPU only under `TRITON_INTERPRET=1` (the interpreter
runs the same kernels in numpy: slow, meant for tests). The dispatch layer has already validated
every argument; `unsupported` names the calls these kernels cannot do (head dims, dtypes,
dropout), so `auto` skips them and an explicit `backend="triton"` raises with the reason.
Kernel modules are imported lazily: importing this module does not import triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LN_MAX_N = 16384  # kernels.layer_norm.MAX_N (kept here so `unsupported` needs no triton import)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability(device_type: str) -> str | None:
    """None where the kernels can run on `device_type`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton: not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and _interpreting():
        return None
    if device_type == "cpu":
        return "triton: needs a CUDA device (set TRITON_INTERPRET=1 to run the interpreter on CPU)"
    return f"triton: no kernels for device type {device_type!r} (CUDA, or CPU under TRITON_INTERPRET=1)"


def unsupported(op: str, **call) -> str | None:
    """None if the kernels handle this call, else the reason (checked before any kernel runs)."""
    dtype = call.get("dtype")
    if dtype is not None and dtype not in _DTYPES and op not in ("sample", "linear"):
        return f"triton: {op} supports dtypes fp16/bf16/fp32, got {dtype}"
    if op in ("causal_attention", "decode_attention"):
        head_dim = call.get("head_dim")
        if head_dim is not None and head_dim not in _HEAD_DIMS:
            return f"triton: {op} supports head dims {_HEAD_DIMS}, got {head_dim}"
    if op == "causal_attention" and call.get("dropout_p", 0.0) > 0.0:
        return f"triton: causal_attention has no dropout (got dropout_p={call['dropout_p']}); use the torch backend for training with dropout"
    if op == "layer_norm":
        n = call.get("n")
        if n is not None and n > _LN_MAX_N:
            return f"triton: layer_norm rows must have N <= {_LN_MAX_N}, got {n}"
    return None


def _kernels(name: str):
    return importlib.import_module(f"gptfast.kernels.{name}")


def causal_attention(q, k, v, scale=None, dropout_p=0.0):
    if dropout_p > 0.0:  # reached only by a direct call: the dispatch layer asks `unsupported` first
        raise ValueError(f"causal_attention: the triton backend has no dropout, got dropout_p={dropout_p}")
    return _kernels("attention").causal_attention(q, k, v, scale)


def layer_norm(x, weight, bias, eps=1e-5):
    return _kernels("layer_norm").layer_norm(x, weight, bias, eps)


def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, activation="gelu_tanh"):
    w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)  # no-ops unless weight-only bf16
    return _kernels("gelu_mlp").gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, activation=activation)


def linear(x, weight, bias=None):
    # No Triton kernel on purpose: a linear layer is a plain GEMM, and cuBLAS (through F.linear) is
    # the right kernel for it; a Triton GEMM would only match it. Weight-only bf16: widened exactly.
    return F.linear(x, weight.to(x.dtype), bias)


def quantized_linear(x, qweight, scale, zero=None, bias=None, *, bits, group_size, act_int8=False):
    # Weight-only int8 / int4 GEMV and small-M GEMM dequantizing in registers (kernels/quant_linear.py).
    # act_int8 is the native CPU's activation-quantizing option: ignored here (weight-only math),
    # as the torch backend ignores it.
    return _kernels("quant_linear").quantized_linear(x, qweight, scale, zero, bias, bits=bits,
                                                     group_size=group_size)


def decode_attention(q, k_cache, v_cache, cache_lens, scale=None):
    return _kernels("decode_attention").decode_attention(q, k_cache, v_cache, cache_lens, scale)


def sample(logits, temperature=1.0, top_k=None, top_p=None, uniform=None, *, generator=None):
    from gptfast.ops import reference

    uniform = reference.as_uniform(logits, temperature, uniform, generator)
    return _kernels("sampling").sample(logits, temperature, top_k, top_p, uniform)
