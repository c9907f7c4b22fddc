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
place (`model.Linear`, fp32; `quantize.BF16Linear`); otherwise `step_weights` returns None and
generation runs the model's forward.
"""

from __future__ import annotations

import torch

from gptfast import ops
from gptfast.model import GPT, Linear
from gptfast.quantize import BF16Embedding, BF16Linear

_STEP_OPS = ("layer_norm", "linear", "decode_attention", "gelu_mlp")


def _readable(m: torch.nn.Module) -> bool:
    """A linear layer whose (out, in) weight the fused step reads in place."""
    return (type(m) is Linear and m.weight.dtype == torch.float32) or type(m) is BF16Linear


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
    if type(tr.wte) not in (torch.nn.Embedding, BF16Embedding) or not _readable(model.lm_head):
        return None
    blocks = list(tr.h)
    linears = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    if not all(_readable(m) for m in linears):
        return None
    eps = {float(b.ln_1.eps) for b in blocks} | {float(b.ln_2.eps) for b in blocks} | {float(tr.ln_f.eps)}
    if len(eps) != 1 or not native.decode_step_available():
        return None

    def vec(t):
        return None if t is None else t.detach()

    return native.DecodeStepWeights(
        wte=tr.wte.weight.detach(), wpe=tr.wpe.weight.detach(),
        ln1_w=[vec(b.ln_1.weight) for b in blocks], ln1_b=[vec(b.ln_1.bias) for b in blocks],
        w_qkv=[b.attn.c_attn.weight.detach() for b in blocks], b_qkv=[vec(b.attn.c_attn.bias) for b in blocks],
        w_o=[b.attn.c_proj.weight.detach() for b in blocks], b_o=[vec(b.attn.c_proj.bias) for b in blocks],
        ln2_w=[vec(b.ln_2.weight) for b in blocks], ln2_b=[vec(b.ln_2.bias) for b in blocks],
        w_fc=[b.mlp.c_fc.weight.detach() for b in blocks], b_fc=[vec(b.mlp.c_fc.bias) for b in blocks],
        w_proj=[b.mlp.c_proj.weight.detach() for b in blocks], b_proj=[vec(b.mlp.c_proj.bias) for b in blocks],
        lnf_w=vec(tr.ln_f.weight), lnf_b=vec(tr.ln_f.bias), w_head=model.lm_head.weight.detach(),
        eps=eps.pop(), exact_gelu=cfg.activation == "gelu",
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
