"""The Python parts of gptfast's native ops, registered with `torch.library` once the library loads.

- A fake (meta) kernel for every op of the schema (csrc/registration.cpp), so the ops trace under
  `torch.compile` / `opcheck`. The C++ kernels always return contiguous tensors: the fakes say the same.
- Autograd for the `*_fwd` / `*_bwd` pairs (layer_norm, gelu_mlp, causal_attention) and for
  `skinny_linear`, so the public ops are differentiable (also under `torch.compile`).

`register()` is called by `_loader.load_extension` after the library is loaded (the fakes need the
schemas). To refine a fake kernel, call `torch.library.register_fake("gptfast::<op>", fn)` after
that; do not call `register_autograd` again for an op registered here: edit it here.
"""

from __future__ import annotations

import torch

_REGISTERED = False  # fakes + autograd: once per process, whatever the loader state says


# ----------------------------------------------------------------------------- fake kernels


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # The C++ kernels always return contiguous tensors: the fakes must say the same.
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _fake_check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("gptfast::layer_norm_fwd")
    def _(x, weight, bias, eps):
        _fake_check(x.dim() == 2, f"layer_norm_fwd: x must be 2-D (M, N), got {tuple(x.shape)}")
        M, N = x.shape
        for name, t in (("weight", weight), ("bias", bias)):
            _fake_check(t is None or tuple(t.shape) == (N,), f"layer_norm_fwd: {name} must have shape ({N},)")
            _fake_check(t is None or t.device == x.device, f"layer_norm_fwd: {name} must be on x's device")
        return _empty((M, N), x), _empty((M,), x, torch.float32), _empty((M,), x, torch.float32)

    @reg("gptfast::layer_norm_bwd")
    def _(dy, x, weight, mean, rstd):
        _fake_check(x.dim() == 2 and dy.shape == x.shape, "layer_norm_bwd: dy and x must be (M, N)")
        M, N = x.shape
        return _empty((M, N), x), _empty((N,), x), _empty((N,), x)

    @reg("gptfast::gelu_mlp_fwd")
    def _(x, w_fc, b_fc, w_proj, b_proj, exact=False):
        _fake_check(x.dim() == 2 and w_fc.dim() == 2 and w_proj.dim() == 2, "gelu_mlp_fwd: x, w_fc, w_proj must be 2-D")
        _fake_check(w_fc.shape[1] == x.shape[1] and w_proj.shape[1] == w_fc.shape[0], "gelu_mlp_fwd: shape mismatch")
        M, F = x.shape[0], w_fc.shape[0]
        return _empty((M, w_proj.shape[0]), x), _empty((M, F), x)

    @reg("gptfast::gelu_mlp_infer")
    def _(x, w_fc, b_fc, w_proj, b_proj, exact=False):
        _fake_check(x.dim() == 2 and w_fc.dim() == 2 and w_proj.dim() == 2, "gelu_mlp_infer: x, w_fc, w_proj must be 2-D")
        _fake_check(w_fc.shape[1] == x.shape[1] and w_proj.shape[1] == w_fc.shape[0], "gelu_mlp_infer: shape mismatch")
        return _empty((x.shape[0], w_proj.shape[0]), x)

    @reg("gptfast::gelu_mlp_bwd")
    def _(dy, x, w_fc, w_proj, pre, exact=False):
        F, C = w_fc.shape
        C_out = w_proj.shape[0]
        return (_empty(tuple(x.shape), x), _empty((F, C), x), _empty((F,), x),
                _empty((C_out, F), x), _empty((C_out,), x))

    @reg("gptfast::causal_attention_fwd")
    def _(q, k, v, scale):
        _fake_check(q.dim() == 4, f"causal_attention_fwd: q must be 4-D (B, H, T, D), got {tuple(q.shape)}")
        B, H, T, D = q.shape
        return _empty((B, H, T, D), q), _empty((B, H, T), q, torch.float32)

    @reg("gptfast::causal_attention_bwd")
    def _(dout, q, k, v, out, lse, scale):
        return _empty(tuple(q.shape), q), _empty(tuple(k.shape), k), _empty(tuple(v.shape), v)

    @reg("gptfast::decode_attention")
    def _(q, k_cache, v_cache, cache_lens, scale):
        return _empty(tuple(q.shape), q)

    @reg("gptfast::skinny_linear")
    def _(x, weight, bias):
        _fake_check(x.dim() == 2 and weight.dim() == 2, "skinny_linear: x and weight must be 2-D")
        _fake_check(weight.shape[1] == x.shape[1], f"skinny_linear: weight must have shape (N, {x.shape[1]})")
        _fake_check(bias is None or tuple(bias.shape) == (weight.shape[0],),
                    f"skinny_linear: bias must have shape ({weight.shape[0]},)")
        return _empty((x.shape[0], weight.shape[0]), x)

    @reg("gptfast::quantized_linear")
    def _(x, qweight, scale, zero, bias, bits, group_size, act_int8):
        _fake_check(bits in (4, 8), f"quantized_linear: bits must be 8 or 4, got {bits}")
        _fake_check(x.dim() == 2 and qweight.dim() == 2, "quantized_linear: x and qweight must be 2-D")
        K = qweight.shape[1] * (8 // bits)
        _fake_check(x.shape[1] == K, f"quantized_linear: x must have K = {K} columns to match qweight "
                    f"{tuple(qweight.shape)} (bits={bits}), got shape {tuple(x.shape)}")
        _fake_check(bias is None or tuple(bias.shape) == (qweight.shape[0],),
                    f"quantized_linear: bias must have shape ({qweight.shape[0]},)")
        return _empty((x.shape[0], qweight.shape[0]), x)

    @reg("gptfast::decode_step")
    def _(tokens, pos, wte, wpe, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
          lnf_w, lnf_b, w_head, k_cache, v_cache, s_qkv, z_qkv, s_o, z_o, s_fc, z_fc, s_proj, z_proj, s_head,
          z_head, s_wte, z_wte, eps, exact_gelu=False, bits=0, group_size=0, head_bits=0, head_group_size=0,
          wte_bits=0, wte_group_size=0, act_int8=False):
        _fake_check(tokens.dim() == 1, f"decode_step: tokens must be 1-D (B,), got {tuple(tokens.shape)}")
        _fake_check(w_head.dim() == 2, f"decode_step: w_head must be 2-D (V, C), got {tuple(w_head.shape)}")
        L = len(k_cache)
        _fake_check(len(v_cache) == L, f"decode_step: k_cache and v_cache must hold one tensor per layer each, "
                    f"got {L} and {len(v_cache)}")
        lists = dict(ln1_w=ln1_w, ln1_b=ln1_b, w_qkv=w_qkv, b_qkv=b_qkv, w_o=w_o, b_o=b_o, ln2_w=ln2_w,
                     ln2_b=ln2_b, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj)
        for name, t in lists.items():
            _fake_check(len(t) == L, f"decode_step: {name} must hold one entry per layer ({L}, the length of "
                        f"k_cache), got {len(t)}")
        return _empty((tokens.shape[0], w_head.shape[0]), wpe, torch.float32)

    @reg("gptfast::erf")
    def _(x):
        return _empty(tuple(x.shape), x)

    @reg("gptfast::sample")
    def _(logits, temperature, top_k, top_p, uniform):
        _fake_check(logits.dim() == 2, f"sample: logits must be 2-D (B, V), got {tuple(logits.shape)}")
        return _empty((logits.shape[0],), logits, torch.int64)


# ----------------------------------------------------------------------------- autograd


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.gptfast.layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


def _mlp_setup(ctx, inputs, output):
    x, w_fc, b_fc, w_proj, b_proj = inputs[:5]
    _y, pre = output
    ctx.save_for_backward(x, w_fc, w_proj, pre)
    ctx.has_b = (b_fc is not None, b_proj is not None)
    ctx.exact = bool(inputs[5]) if len(inputs) > 5 else False  # the schema's default
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(pre)


def _mlp_backward(ctx, dy, _dpre):
    x, w_fc, w_proj, pre = ctx.saved_tensors
    dx, dw_fc, db_fc, dw_proj, db_proj = torch.ops.gptfast.gelu_mlp_bwd(dy, x, w_fc, w_proj, pre, ctx.exact)
    grads = (dx, dw_fc, (db_fc if ctx.has_b[0] else None), dw_proj, (db_proj if ctx.has_b[1] else None))
    return grads + (None,) * (ctx.n_inputs - 5)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.gptfast.causal_attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def _skinny_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _skinny_backward(ctx, dy):
    # Training-size shapes: plain ATen matmuls (the kernel is a forward for few rows).
    x, weight = ctx.saved_tensors
    # bf16 weight with fp32 x (weight-only bf16): fp32 math, the weight's gradient in its dtype.
    return dy @ weight.to(dy.dtype), (dy.t() @ x).to(weight.dtype), (dy.sum(0) if ctx.has_bias else None)


def _register_autograd() -> None:
    reg = torch.library.register_autograd
    reg("gptfast::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)
    reg("gptfast::gelu_mlp_fwd", _mlp_backward, setup_context=_mlp_setup)
    reg("gptfast::causal_attention_fwd", _attention_backward, setup_context=_attention_setup)
    reg("gptfast::skinny_linear", _skinny_backward, setup_context=_skinny_setup)


def register() -> None:
    """Register the fakes and autograd, once per process (the loader calls it after loading)."""
    global _REGISTERED
    if not _REGISTERED:
        _register_fakes()
        _register_autograd()
        _REGISTERED = True
