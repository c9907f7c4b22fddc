"""The `torch` backend: PyTorch's own fused ops. This is the baseline every kernel must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptfast.ops import quant, reference


def availability(device_type: str) -> str | None:
    return None


def unsupported(op: str, **call) -> str | None:
    return None


def _math_causal_attention(q, k, v, scale, dropout_p):
    """softmax(q k^T * scale, causal) v written out, as the reference: IEEE propagation."""
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ v


def causal_attention(q, k, v, scale=None, dropout_p=0.0):
    # NaN / inf contract (see gptfast.ops.reference). PyTorch's fused CPU kernel returns a finite
    # row for a NaN query and for a row whose scores are all -inf or hold +inf (issue #19). On CPU
    # (one pass over k, no device sync) a non-finite k takes the written-out formula; a non-finite
    # q row is made NaN by one elementwise pass over q (no host sync, graph-safe).
    if not q.is_cuda and not torch.compiler.is_compiling() and not bool(torch.isfinite(k).all()):
        return _math_causal_attention(q, k, v, scale, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return out.masked_fill(~torch.isfinite(q).all(-1, keepdim=True), float("nan"))


def layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, activation="gelu_tanh"):
    approximate = "none" if activation == "gelu" else "tanh"
    w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)  # no-ops unless weight-only bf16
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate=approximate), w_proj, b_proj)


def linear(x, weight, bias=None):
    return F.linear(x, weight.to(x.dtype), bias)  # .to: weight-only bf16 (exact widening)


_INT8PACK_MAX_M = 16  # rows up to which the int8 per-channel path calls torch._weight_int8pack_mm


def quantized_linear(x, qweight, scale, zero=None, bias=None, *, bits, group_size, act_int8=False):
    """int8 per channel on CPU, decode-sized calls (M <= 16 rows): `torch._weight_int8pack_mm`
    (what gpt-fast's int8 path lowers to), which takes 2-D x in float32 / bfloat16 / float16 with a
    contiguous last dim and scales in x's dtype (checked on torch 2.13 CPU). Else: dequantize, then
    `F.linear`. Why the row limit: on torch 2.13 CPU (this 2-core VM, 1 thread) it took 2.3 ms at
    M=1, 36 ms at M=16 and 1.5 s at M=512 for a 768 x 3072 matrix, where dequantize + F.linear
    took 1.5 / 2.3 / 42 ms: it is a decode kernel, and a prompt pass through it would take
    minutes. `act_int8` is ignored (weight-only math)."""
    K = x.shape[-1]
    if (bits == 8 and group_size is None and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and 0 < x.numel() <= _INT8PACK_MAX_M * K):
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch._weight_int8pack_mm(x2, qweight, scale.to(x.dtype))
        y = y.view(*x.shape[:-1], qweight.shape[0])
        return y if bias is None else y + bias
    w = quant.dequantize_weight(qweight, scale, zero, bits, group_size, x.dtype)
    return F.linear(x, w, bias)


def decode_attention(q, k_cache, v_cache, cache_lens, scale=None):
    B, H, Tq, D = q.shape
    T_max = k_cache.shape[2]
    lens = cache_lens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
    q_pos = lens - Tq + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    k_pos = torch.arange(T_max, device=q.device).view(1, 1, 1, T_max)
    mask = k_pos <= q_pos  # (B, 1, Tq, T_max), True = attend
    # The cache past each row's length is unwritten memory (garbage, possibly NaN / inf). A masked
    # score still multiplies its value row by 0 inside SDPA, and 0 * NaN = NaN: zero both caches
    # there first, as the reference and native never read them.
    valid = (k_pos < lens).view(B, 1, T_max, 1)  # (B, 1, T_max, 1)
    k_cache = torch.where(valid, k_cache, 0)
    v_cache = torch.where(valid, v_cache, 0)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale)


def sample(logits, temperature=1.0, top_k=None, top_p=None, uniform=None, *, generator=None):
    # The draws come from the dispatch layer (one rule for every backend: reference.draw_uniform),
    # so this inverse-CDF draw (torch.searchsorted) picks the reference's tokens; torch.multinomial
    # would consume the generator its own way.
    uniform = reference.as_uniform(logits, temperature, uniform, generator)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature
    V = x.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        cut = (sorted_probs.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True).clamp(max=V - 1)
        probs = probs.masked_fill(probs < sorted_probs.gather(-1, cut), 0.0)
    return reference._inverse_cdf(probs, uniform)
