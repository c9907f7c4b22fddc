"""The decode step as one native CPU op, when the model's step is all native kernels.

Batch-1 decoding streams every weight once per token and does little else, so the ~110 op calls
a Python step makes (12 layers x LayerNorm, QKV, cache writes, attention, projections, MLP,
residual adds) are overhead worth removing: `gptfast::decode_step` (csrc/cpu/decode_step.cpp)
runs `GPT.forward`'s decode step from C++, calling the same kernels in the same order, so its
logits and cache writes equal the model's forward to the last bit (tests/test_decode_step.py).
It is the CPU counterpart of gpt-fast's CUDA-graph capture of the decode step
(github.com/pytorch-labs/gpt-fast, generate.py). Measured gain: docs/PERF.md.

It applies on CPU with fp32 activations, up to `native.SKINNY_MAX_M` rows, when every op of the
step resolves to the native backend and every linear layer is one whose weight the kernel reads in
place (`model.Linear`, fp32; `quantize.BF16Linear`; `quantize.QuantLinear`, issue #20: the block
linears all in one format, the LM head in its own, quantized or not, one act_int8 flag); otherwise
`step_weights` returns None and generation runs the model's forward.
"""

from __future__ import annotations

import torch

from gptfast import ops
from gptfast.model import GPT, Linear
from gptfast.quantize import BF16Embedding, BF16Linear, QuantEmbedding, QuantLinear

_STEP_OPS = ("layer_norm", "linear", "decode_attention", "gelu_mlp")


def _readable(m: torch.nn.Module) -> bool:
    """A linear layer whose (out, in) weight the fused step reads in place."""
    return (type(m) is Linear and m.weight.dtype == torch.float32) or type(m) is BF16Linear


def _quant_format(m: torch.nn.Module):
    """(bits, group_size, act_int8) of a quantized linear layer (`quantize.QuantLinear`), else None."""
    if type(m) is not QuantLinear:
        return None
    return int(m.bits), m.group_size, bool(m.act_int8)


def step_weights(model: GPT, batch: int, backend: str | None = None):
    """The model's weights by name for `native.decode_step` (a `native.DecodeStepWeights` of
    references, no copies), or None when the fused step does not apply (see the module doc)."""
    from gptfast.ops import native

    cfg = model.config
    if model.device.type != "cpu" or model.dtype != torch.float32 or batch > native.SKINNY_MAX_M:
        return None
    backend = backend if backend is not None else model.backend
    D = cfg.n_embd // cfg.n_head
    call = {"layer_norm": dict(dtype=torch.float32, n=cfg.n_embd), "linear": dict(dtype=torch.float32),
            "decode_attention": dict(dtype=torch.float32, head_dim=D),
            "gelu_mlp": dict(dtype=torch.float32, activation=cfg.activation)}
    try:
        if any(ops.resolve(op, "cpu", backend, **call[op]) != "native" for op in _STEP_OPS):
            return None
    except ops.BackendUnavailableError:
        return None
    tr = model.transformer
    head_q = _quant_format(model.lm_head)
    if type(tr.wte) not in (torch.nn.Embedding, BF16Embedding, QuantEmbedding) or not (_readable(model.lm_head)
                                                                                        or head_q):
        return None
    if type(tr.wte) is QuantEmbedding and tr.wte.dtype != torch.float32:
        return None
    blocks = list(tr.h)
    kinds = [[b.attn.c_attn for b in blocks], [b.attn.c_proj for b in blocks], [b.mlp.c_fc for b in blocks],
             [b.mlp.c_proj for b in blocks]]
    linears = [m for kind in kinds for m in kind]
    # Quantized blocks: every block linear a QuantLinear of one format (the kernel takes one per model).
    formats = {_quant_format(m) for m in linears}
    if formats == {None}:
        block_q = None
        if not all(_readable(m) for m in linears):
            return None
    elif len(formats) == 1:
        block_q = formats.pop()
    else:
        return None
    # act_int8: one flag for the whole step (it applies to the int8 matrices, as the native wrapper)
    acts = {f[2] for f in (block_q, head_q) if f is not None and f[0] == 8}
    if len(acts) > 1:
        return None
    act_int8 = bool(acts and acts.pop())
    for fmt, zeros in ((block_q, any(m.zero is not None for m in linears) if block_q else False),
                       (head_q, head_q is not None and model.lm_head.zero is not None)):
        if fmt is not None:
            try:
                if ops.resolve("quantized_linear", "cpu", backend, dtype=torch.float32, bits=fmt[0],
                               group_size=fmt[1], zero=zeros, act_int8=fmt[2]) != "native":
                    return None
            except ops.BackendUnavailableError:
                return None
    eps = {float(b.ln_1.eps) for b in blocks} | {float(b.ln_2.eps) for b in blocks} | {float(tr.ln_f.eps)}
    if len(eps) != 1 or not native.decode_step_available():
        return None

    def vec(t):
        return None if t is None else t.detach()

    def mats(kind):
        return [(m.qweight if block_q else m.weight).detach() for m in kind]

    quant = {}
    if block_q:
        for name, kind in zip(("qkv", "o", "fc", "proj"), kinds):
            quant["s_" + name] = [m.scale.detach() for m in kind]
            quant["z_" + name] = [vec(m.zero) for m in kind] if any(m.zero is not None for m in kind) else []
        quant.update(bits=block_q[0], group_size=block_q[1])
    head = model.lm_head
    if head_q:
        quant.update(s_head=head.scale.detach(), z_head=vec(head.zero), head_bits=head_q[0],
                     head_group_size=head_q[1])
    if type(tr.wte) is QuantEmbedding:  # its rows dequantized by the step (the tied head's buffers, or its own)
        src = tr.wte.tied_to if tr.wte.tied_to is not None else tr.wte
        wte = src.qweight.detach()
        quant.update(s_wte=src.scale.detach(), z_wte=vec(src.zero), wte_bits=tr.wte.bits,
                     wte_group_size=tr.wte.group_size)
    else:
        wte = tr.wte.weight.detach()
    return native.DecodeStepWeights(
        wte=wte, wpe=tr.wpe.weight.detach(),
        ln1_w=[vec(b.ln_1.weight) for b in blocks], ln1_b=[vec(b.ln_1.bias) for b in blocks],
        w_qkv=mats(kinds[0]), b_qkv=[vec(m.bias) for m in kinds[0]],
        w_o=mats(kinds[1]), b_o=[vec(m.bias) for m in kinds[1]],
        ln2_w=[vec(b.ln_2.weight) for b in blocks], ln2_b=[vec(b.ln_2.bias) for b in blocks],
        w_fc=mats(kinds[2]), b_fc=[vec(m.bias) for m in kinds[2]],
        w_proj=mats(kinds[3]), b_proj=[vec(m.bias) for m in kinds[3]],
        lnf_w=vec(tr.ln_f.weight), lnf_b=vec(tr.ln_f.bias),
        w_head=(head.qweight if head_q else head.weight).detach(),
        eps=eps.pop(), exact_gelu=cfg.activation == "gelu", act_int8=act_int8, **quant,
    )


def decode(model: GPT, weights, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`model(tokens.view(B, 1), input_pos=pos.view(B, 1))`'s decode step as one op: tokens, pos
    (B,) int64 -> logits (B, V) fp32, writing each row's K/V into the model's caches at pos
    (`weights` from `step_weights`; caches from `model.setup_caches`)."""
    from gptfast.ops import native

    caches = model.kv_caches
    logits = native.decode_step(tokens, pos, weights, [c.k for c in caches], [c.v for c in caches])
    lens = pos + 1
    for c in caches:
        c.lens.copy_(lens)
    return logits
