"""Fast KV-cached text generation: `prefill`, `decode_one_token`, `generate` / `stream`.

The split follows gpt-fast's `generate.py` (github.com/pytorch-labs/gpt-fast): `prefill` runs the
prompt once and fills a static, preallocated KV cache; `decode_one_token` is the hot step (one
token per sequence against the cache) and the only thing compiled / CUDA-graph captured; the
Python loop in `_run` does the bookkeeping (stop tokens, lengths, sampling, streaming).

The engine runs the model's own weights but does its own forward over `model.transformer.h`
(ln_1 -> c_attn -> split heads -> write k/v into the cache -> attention -> c_proj -> residual ->
ln_2 -> MLP -> residual), calling the `gptfast.ops` backend the model uses: prefill attention is
`causal_attention`, decode attention is `decode_attention` with per-sequence `cache_lens`,
LayerNorm is `layer_norm`, the MLP is `gelu_mlp`, the draw is `sample`.

Speed on CPU (batch-1 decoding is a chain of matrix-vector products, i.e. memory bound):
- Weight layout. A GEMV reads each weight once; which layout streams fastest depends on the BLAS
  kernel, and on this CPU (Zen 4, MKL/oneDNN through torch 2.13) `addmm` on an (in, out) copy beat
  `F.linear` on the (out, in) `nn.Linear` weight for c_attn, attn.c_proj, mlp.c_fc and the tied LM
  head (50257 x 768: ~6 vs ~12 ms per token), while mlp.c_proj (3072 -> 768) was faster as (out, in).
  The engine keeps (in, out) copies of those weights (`DecodeWeights`, see `_CPU_FP32_LAYOUT`):
  for GPT-2 124M that is 21.2M block + 38.6M head parameters, ~240 MB extra in fp32. Copies are
  cached per model and rebuilt when any parameter changes (keyed on each parameter's `_version`
  and storage pointer, so in-place optimizer steps and `load_state_dict` both refresh them).
  `ops.gelu_mlp` is given transposed *views* of the copies, which keep its (out, in) contract.
  On CUDA no copies are made (cuBLAS reads both layouts at full speed).
- Native backend, CPU fp32: no copies at all. MKL's sgemm is slow for a few rows (B = 8 rows x
  the 768 x 50257 head: ~33-38 ms where streaming the weight takes ~8-10 ms), so when the ops
  resolve to `native` the decode step runs c_attn, attn.c_proj (+ residual) and the LM head
  through `native.skinny_linear` for B <= `native.SKINNY_MAX_M` (16), and the native gelu_mlp
  switches to the same kernel by itself; that kernel wants the (out, in) nn.Linear weights, so
  `decode_weights` keeps transposed views of the module's own weights (`_NO_COPY_LAYOUT`, the
  tied `wte` is the head) and the prompt pass (a real GEMM) runs addmm on those views. Measured
  (GPT-2 124M, random weights, 2 threads, Zen 3): B = 8 decode 117 -> 55 ms/step, B = 1 ~37 ->
  ~28 ms/step, and 240 MB of copies saved. Batches above the threshold use addmm on the views.
- Python overhead. The dispatch layer validates every call (and `decode_attention`'s bounds check
  reads `cache_lens`, a device sync on GPU); the engine resolves each op's backend function once
  per generate call with `ops.resolve` and calls the backend module directly, validating its own
  inputs once at entry. The residual add is folded into the projections' `addmm`.
- Fused step (native CPU, B <= 16). Even so, one step is ~110 op calls from Python: ~2 ms of a
  ~28 ms batch-1 step on the 2-core VM (measured with a model whose kernels take ~0). So when every
  op of the step resolves to `native` on CPU fp32, the step runs as one op, `gptfast::decode_step`
  (csrc/cpu/decode_step.cpp): the same kernels in the same order called from C++, bit-for-bit the
  Python step (tests/test_decode_step.py). Measured interleaved, GPT-2 124M: 1.07-1.10x at batch
  1, 1.11x at batch 8 (`gptfast bench generate`, "python step" rows). It is the CPU counterpart of gpt-fast's CUDA-graph capture.
  `compile=True` keeps the Python step (that is what gets compiled); `FUSED_STEP = False` too.
- Weight-only bf16 (`weight_dtype="bf16"`, CPU fp32, native). Batch-1 decoding streams the
  weights, so halving their bytes is the one lever left once the step runs at the bandwidth bound.
  The matrices and the tied wte / LM head are held as bf16 copies (+248 MB for GPT-2 124M; the
  fp32 model stays as it is); the skinny kernel widens each element exactly (a 16-bit shift: no
  avx512_bf16 needed) and accumulates in fp32; LayerNorm, biases, wpe, attention, the KV cache and
  the logits stay fp32. So the result is exactly fp32 math on bf16-rounded weights (tested against
  the reference on such weights); the rounding itself cost the shipped model nothing measurable
  (validation perplexity 4.6114 -> 4.6113). The prompt pass and batches above 16 rows widen the
  matrices per call and use addmm.

Beyond the block size: see `overflow` in `generate`.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.errors import InputError

# ----------------------------------------------------------------------------- decode weights

# Which linears get an (in, out) copy ("io") on CPU fp32 when the engine decodes with addmm (not
# with native's skinny_linear, which uses every weight in place); the others are used in place
# ("oi"). Measured on this project's CPU (see module docstring); revisit on another machine.
_CPU_FP32_LAYOUT = {"c_attn": "io", "attn_proj": "io", "c_fc": "io", "mlp_proj": "oi", "lm_head": "io"}
_NO_COPY_LAYOUT = {k: "oi" for k in _CPU_FP32_LAYOUT}


@dataclass
class LayerWeights:
    """One block's weights in decode layout. Matrices are stored as the right-hand operand of
    `x @ W`, shape (in, out): either a contiguous copy or a transposed view of the module's own
    (out, in) weight (no copy)."""

    ln1_w: torch.Tensor | None  # (C,)
    ln1_b: torch.Tensor | None
    ln_eps: float
    w_qkv: torch.Tensor  # (C, 3C)
    b_qkv: torch.Tensor | None  # (3C,)
    w_o: torch.Tensor  # (C, C)
    b_o: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None
    w_fc: torch.Tensor  # (C, F)
    b_fc: torch.Tensor | None  # (F,)
    w_proj: torch.Tensor  # (F, C)
    b_proj: torch.Tensor | None


@dataclass
class DecodeWeights:
    layers: list[LayerWeights]
    wte: torch.Tensor  # (V, C)
    wpe: torch.Tensor  # (block_size, C)
    lnf_w: torch.Tensor | None
    lnf_b: torch.Tensor | None
    lnf_eps: float
    w_head: torch.Tensor  # (C, V)
    n_head: int
    dtype: torch.dtype  # activations, vectors, KV cache
    weight_dtype: torch.dtype | None = None  # matrices and wte (None = dtype)
    copied_bytes: int = 0  # memory held by the engine's own copies (0 = all views)
    activation: str = "gelu_tanh"  # the MLP's GELU: the model's `config.activation`


def _param_key(model: torch.nn.Module) -> tuple:
    return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in model.parameters())


_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def decode_weights(model, dtype: torch.dtype | None = None, layout: dict | None = None,
                   weight_dtype: torch.dtype | None = None) -> DecodeWeights:
    """The decode-layout weights of `model` (cached; rebuilt when a parameter changed).

    dtype: weights/activations dtype (default: the model's). On CPU fp32 the layout is
    `_CPU_FP32_LAYOUT`; otherwise (CUDA, bf16) every matrix is used in place or cast once.
    weight_dtype: store the matrices (c_attn, c_proj, c_fc, mlp c_proj, the tied wte / LM head) in
    this dtype instead (weight-only bf16: one bf16 copy of each, used in place by the native
    kernels, which widen and accumulate in fp32); vectors and wpe stay in `dtype`.
    """
    p0 = model.transformer.wte.weight
    dtype = dtype or p0.dtype
    if weight_dtype is not None and weight_dtype != dtype:
        layout = _NO_COPY_LAYOUT
    else:
        weight_dtype = dtype
    if layout is None:
        layout = _CPU_FP32_LAYOUT if (p0.device.type == "cpu" and dtype == torch.float32) else _NO_COPY_LAYOUT
    activation = getattr(model.config, "activation", "gelu_tanh")
    cache_key = (dtype, weight_dtype, tuple(sorted(layout.items())), activation)
    per_model = _WEIGHTS.setdefault(model, {})
    key = _param_key(model)
    hit = per_model.get(cache_key)
    if hit is not None and hit[0] == key:
        return hit[1]
    copied = 0

    def vec(t):
        return None if t is None else t.detach().to(dtype)

    cast: dict[int, torch.Tensor] = {}  # one copy per parameter (the LM head is tied to wte)

    def to_wdtype(t):
        nonlocal copied
        t = t.detach()
        if t.dtype == weight_dtype:
            return t
        if t.data_ptr() not in cast:
            cast[t.data_ptr()] = t.to(weight_dtype)
            copied += t.numel() * cast[t.data_ptr()].element_size()
        return cast[t.data_ptr()]

    def mat(lin_weight, kind):  # nn.Linear weight (out, in) -> (in, out) operand
        nonlocal copied
        if weight_dtype != dtype:
            return to_wdtype(lin_weight).t()
        w = lin_weight.detach().to(dtype)
        if layout[kind] == "io":
            w = w.t().contiguous()
            copied += w.numel() * w.element_size()
            return w
        if w.data_ptr() != lin_weight.data_ptr():
            copied += w.numel() * w.element_size()
        return w.t()

    layers = []
    for blk in model.transformer.h:
        a, m = blk.attn, blk.mlp
        layers.append(LayerWeights(
            ln1_w=vec(blk.ln_1.weight), ln1_b=vec(blk.ln_1.bias), ln_eps=float(blk.ln_1.eps),
            w_qkv=mat(a.c_attn.weight, "c_attn"), b_qkv=vec(a.c_attn.bias),
            w_o=mat(a.c_proj.weight, "attn_proj"), b_o=vec(a.c_proj.bias),
            ln2_w=vec(blk.ln_2.weight), ln2_b=vec(blk.ln_2.bias),
            w_fc=mat(m.c_fc.weight, "c_fc"), b_fc=vec(m.c_fc.bias),
            w_proj=mat(m.c_proj.weight, "mlp_proj"), b_proj=vec(m.c_proj.bias),
        ))
    tr = model.transformer
    wte = to_wdtype(tr.wte.weight) if weight_dtype != dtype else tr.wte.weight.detach().to(dtype)
    w = DecodeWeights(
        layers=layers, wte=wte, wpe=tr.wpe.weight.detach().to(dtype),
        lnf_w=vec(tr.ln_f.weight), lnf_b=vec(tr.ln_f.bias), lnf_eps=float(tr.ln_f.eps),
        w_head=mat(model.lm_head.weight, "lm_head"), n_head=model.config.n_head, dtype=dtype,
        weight_dtype=weight_dtype, activation=activation,
    )
    if dtype != p0.dtype:
        copied += w.wpe.numel() * w.wpe.element_size()
        if weight_dtype == dtype:
            copied += w.wte.numel() * w.wte.element_size()
    w.copied_bytes = copied
    per_model.clear()  # one layout per model at a time: stale copies must not pin memory
    per_model[cache_key] = (key, w)
    return w


# The fused native CPU step (`decode_one_token_fused`) is used whenever it applies; False runs the
# Python step instead (benchmarks compare the two; debugging).
FUSED_STEP = True

# ----------------------------------------------------------------------------- ops, resolved once


@dataclass
class OpFns:
    """Backend functions for the engine's ops, resolved once per generate call (see module doc)."""

    causal_attention: object
    decode_attention: object
    layer_norm: object
    gelu_mlp: object
    sample: object
    names: dict = field(default_factory=dict)
    # Native CPU fp32 only (see `_skinny_for`): skinny_linear(x, w_out_in, b) and the largest batch
    # it is used for in `decode_one_token`; None = decode with addmm.
    skinny: object = None
    skinny_max_m: int = 0


def resolve_ops(backend: str | None, device_type: str, dtype: torch.dtype, head_dim: int, n: int) -> OpFns:
    calls = {
        "causal_attention": dict(dtype=dtype, head_dim=head_dim, dropout_p=0.0),
        "decode_attention": dict(dtype=dtype, head_dim=head_dim),
        "layer_norm": dict(dtype=dtype, n=n),
        "gelu_mlp": dict(dtype=dtype),
        "sample": dict(dtype=torch.float32),
    }
    names = {op: ops.resolve(op, device_type, backend, **call) for op, call in calls.items()}
    fns = {op: getattr(ops._load(name), op) for op, name in names.items()}
    return OpFns(**fns, names=names)


def _skinny_for(fns: OpFns, device_type: str, dtype: torch.dtype):
    """(skinny_linear, max batch) when the engine's ops resolve to `native` on CPU fp32, else (None, 0)."""
    if device_type != "cpu" or dtype != torch.float32 or fns.names.get("gelu_mlp") != "native":
        return None, 0
    from gptfast.ops import native

    if not native.skinny_linear_available("cpu"):
        return None, 0
    return native.skinny_linear, native.SKINNY_MAX_M


# ----------------------------------------------------------------------------- the forward passes


def _as(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w in x's dtype: weight-only bf16 matrices are widened (exactly) where no kernel reads bf16
    directly (the prompt pass, batches above the skinny threshold, non-native backends)."""
    return w if w.dtype == x.dtype else w.to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (M, in) @ w (in, out) + b -> (M, out)."""
    w = _as(w, x)
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def _residual_linear(res: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """res + x @ w + b, with the residual add folded into addmm."""
    y = torch.addmm(res, x, _as(w, x))
    return y if b is None else y.add_(b)


def _mlp(fns: OpFns, lw: LayerWeights, h: torch.Tensor, activation: str) -> torch.Tensor:
    # ops.gelu_mlp takes nn.Linear's (out, in) layout: give it transposed views of the operands.
    # The native CPU kernel reads bf16 weights itself (weight-only bf16); others get fp32 copies.
    w_fc, w_proj = lw.w_fc.t(), lw.w_proj.t()
    if fns.names.get("gelu_mlp") != "native":
        w_fc, w_proj = _as(w_fc, h), _as(w_proj, h)
    return fns.gelu_mlp(h, w_fc, lw.b_fc, w_proj, lw.b_proj, activation=activation)


def prefill(
    w: DecodeWeights,
    fns: OpFns,
    k_cache: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    tokens: torch.Tensor,
    lens: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run right-padded prompts, write their K/V into the cache, return next-token logits.

    tokens: (b, T) int64, row i's real tokens at 0..lens[i]-1, anything after (pads are never
    attended by a real token under the causal mask, and their K/V land past the valid length).
    lens: (b,) int64 on the device. rows: (b,) int64 cache rows to fill (None = rows 0..b-1).
    k_cache / v_cache: per layer (B, H, T_max, D), T >= T_max not allowed.
    Returns (b, V) fp32 logits at each row's last real position.
    """
    b, T = tokens.shape
    C = w.wte.shape[1]
    H = w.n_head
    D = C // H
    pos = torch.arange(T, device=tokens.device)
    x = (F.embedding(tokens, w.wte).to(w.dtype) + F.embedding(pos, w.wpe)).view(b * T, C)  # (b*T, C)
    for lw, kc, vc in zip(w.layers, k_cache, v_cache):
        h = fns.layer_norm(x, lw.ln1_w, lw.ln1_b, lw.ln_eps)
        qkv = _linear(h, lw.w_qkv, lw.b_qkv).view(b, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, H, T, D)
        if rows is None:
            kc[:b, :, :T].copy_(k)
            vc[:b, :, :T].copy_(v)
        else:
            kc[rows, :, :T] = k
            vc[rows, :, :T] = v
        y = fns.causal_attention(q, k, v, None, 0.0)  # (b, H, T, D)
        y = y.transpose(1, 2).reshape(b * T, C)
        x = _residual_linear(x, y, lw.w_o, lw.b_o)
        x = x + _mlp(fns, lw, fns.layer_norm(x, lw.ln2_w, lw.ln2_b, lw.ln_eps), w.activation)
    last = x.view(b, T, C)[torch.arange(b, device=x.device), lens - 1]  # (b, C): own last real token
    last = fns.layer_norm(last, w.lnf_w, w.lnf_b, w.lnf_eps)
    return torch.mm(last, _as(w.w_head, last)).float()  # (b, V)


def decode_one_token(
    w: DecodeWeights,
    fns: OpFns,
    k_cache: list[torch.Tensor],
    v_cache: list[torch.Tensor],
    tokens: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """One decoding step: tokens (B,) int64 at positions pos (B,) int64 -> logits (B, V) fp32.

    Writes each token's K/V at its own position and attends to cache positions 0..pos[b]
    (cache_lens = pos + 1). Shapes are static, so this is what `torch.compile` / CUDA graphs take.
    """
    B = tokens.shape[0]
    C = w.wte.shape[1]
    H = w.n_head
    D = C // H
    T_max = k_cache[0].shape[2]
    cache_lens = pos + 1
    # Row (b, h) of the cache viewed as (B*H*T_max, D) that receives the new K/V: computed once
    # per step for all layers, then one index_copy_ per tensor (cheaper than advanced indexing).
    slots = (torch.arange(B * H, device=tokens.device).view(B, H) * T_max + pos.view(B, 1)).view(-1)
    # Few rows on native CPU fp32: skinny_linear on the (out, in) weights (the operands' .t() is the
    # module's own contiguous weight, see `_run`), which streams each weight once; gelu_mlp's
    # native kernel switches to the same kernel by itself for few rows.
    sk = fns.skinny if (fns.skinny is not None and B <= fns.skinny_max_m) else None
    x = F.embedding(tokens, w.wte).to(w.dtype) + F.embedding(pos, w.wpe)  # (B, C)
    for lw, kc, vc in zip(w.layers, k_cache, v_cache):
        h = fns.layer_norm(x, lw.ln1_w, lw.ln1_b, lw.ln_eps)
        qkv = (sk(h, lw.w_qkv.t(), lw.b_qkv) if sk else _linear(h, lw.w_qkv, lw.b_qkv)).view(B, 3, H, D)
        kc.view(-1, D).index_copy_(0, slots, qkv[:, 1].reshape(B * H, D))  # at each row's own position
        vc.view(-1, D).index_copy_(0, slots, qkv[:, 2].reshape(B * H, D))
        y = fns.decode_attention(qkv[:, 0].unsqueeze(2), kc, vc, cache_lens, None)  # (B, H, 1, D)
        if sk:
            x = x + sk(y.view(B, C), lw.w_o.t(), lw.b_o)
        else:
            x = _residual_linear(x, y.view(B, C), lw.w_o, lw.b_o)
        x = x + _mlp(fns, lw, fns.layer_norm(x, lw.ln2_w, lw.ln2_b, lw.ln_eps), w.activation)
    x = fns.layer_norm(x, w.lnf_w, w.lnf_b, w.lnf_eps)
    return (sk(x, w.w_head.t(), None) if sk else torch.mm(x, _as(w.w_head, x))).float()  # (B, V)


def fused_step_args(w: DecodeWeights, fns: OpFns, device_type: str) -> tuple | None:
    """The weights as `native.decode_step` takes them (built once per generate call), or None when
    the fused CPU step does not apply: it needs the native backend for every op of the step, fp32
    activations, one LayerNorm eps and the library's `decode_step` kernel."""
    if device_type != "cpu" or w.dtype != torch.float32 or fns.skinny is None:
        return None
    if any(fns.names.get(op) != "native" for op in ("decode_attention", "layer_norm", "gelu_mlp")):
        return None
    eps = {lw.ln_eps for lw in w.layers} | {w.lnf_eps}
    if len(eps) != 1:
        return None
    from gptfast.ops import native

    if not native.decode_step_available():
        return None
    flat: list[torch.Tensor | None] = []
    for lw in w.layers:  # nn.Linear (out, in) layouts: the operands' .t() (see `decode_weights`)
        flat += [lw.ln1_w, lw.ln1_b, lw.w_qkv.t(), lw.b_qkv, lw.w_o.t(), lw.b_o,
                 lw.ln2_w, lw.ln2_b, lw.w_fc.t(), lw.b_fc, lw.w_proj.t(), lw.b_proj]
    return (w.wte, w.wpe, flat, w.lnf_w, w.lnf_b, w.w_head.t(), eps.pop(), w.activation == "gelu")


def decode_one_token_fused(args: tuple, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                           tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`decode_one_token` as one native CPU op (csrc/cpu/decode_step.cpp): the same kernels in the
    same order with no Python between them; `args` from `fused_step_args`."""
    from gptfast.ops import native

    wte, wpe, flat, lnf_w, lnf_b, w_head, eps, exact_gelu = args
    return native.decode_step(tokens, pos, wte, wpe, flat, lnf_w, lnf_b, w_head, k_cache, v_cache, eps, exact_gelu)


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as Hugging Face's
    `RepetitionPenaltyLogitsProcessor`: a token already in the sequence (prompt included) has a
    positive logit divided by `penalty` and a negative one multiplied by it.

    logits: (B, V) fp32; seen: (B, V) bool. Returns a new (B, V) tensor.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def token_logprobs(logits: torch.Tensor, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """log-probability of `tokens` (B,) under softmax(logits / temperature), (B,) fp32.

    The engine passes the logits after the repetition penalty; temperature 0 (greedy) counts as 1.
    top-k / top-p truncation is *not* applied, so every value is finite and comparable across
    truncation settings (the draw itself does use the truncated distribution).
    """
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, dim=-1).gather(1, tokens.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------- generation


@dataclass
class Step:
    """One step of `stream`: for each row the token produced (None once the row has finished)
    and, with `return_logprobs`, its log-probability (see `token_logprobs`)."""

    tokens: list[int | None]
    logprobs: list[float | None] | None = None


def _as_prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise InputError(
                f"generate: prompts tensor must be (B, T) int64, got {prompts.dtype} {tuple(prompts.shape)}"
            )
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"generate: prompts must be a non-empty list of token-id lists or a (B, T) tensor, "
                         f"got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InputError(f"generate: prompts[{i}] must be a list of ints, got {p!r:.80}")
        out.append(list(p))
    return out


def _per_row(value, B: int, name: str) -> list[int]:
    vals = [value] * B if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, (list, tuple)) or len(vals) != B:
        raise InputError(f"generate: {name} must be an int or a list of {B} ints, got {value!r}")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"generate: {name} must be int(s) >= 0, got {value!r}")
    return list(vals)


def _check_sampling(temperature, top_k, top_p, repetition_penalty) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"generate: top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise InputError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
    if not (isinstance(repetition_penalty, (int, float)) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise InputError(f"generate: repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _as_weight_dtype(weight_dtype, dtype: torch.dtype, device_type: str) -> torch.dtype | None:
    """None (matrices in `dtype`) or torch.bfloat16 (weight-only bf16: CPU, fp32 activations)."""
    if weight_dtype is None:
        return None
    wd = _DTYPES.get(weight_dtype) if isinstance(weight_dtype, str) else weight_dtype
    if wd == dtype:
        return None
    if wd != torch.bfloat16:
        raise InputError(f"generate: weight_dtype must be None, 'bf16' or the activation dtype, got {weight_dtype!r}")
    if device_type != "cpu" or dtype != torch.float32:
        raise InputError(f"generate: weight_dtype='bf16' (bf16 weights, fp32 math) is a CPU fp32 option, got device "
                         f"{device_type} with dtype {dtype}; on CUDA pass dtype='bf16'")
    return wd


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InputError(f"generate: dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


class _Compiled:
    """torch.compile'd step functions, one per (model, dtype, batch, T_max) (see `compile=`)."""

    cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_fns(model, device_type: str):
    got = _Compiled.cache.get(model)
    if got is None:
        if device_type == "cuda":
            # gpt-fast: the decode step as CUDA graphs (static cache, static inputs); the prompt
            # pass with dynamic shapes so each prompt length does not recompile.
            dec = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
            pre = torch.compile(prefill, dynamic=True)
        else:
            dec = torch.compile(decode_one_token)
            pre = prefill  # prompt shapes vary; eager is fine for one pass
        got = (pre, dec)
        _Compiled.cache[model] = got
    return got


def _check_step_logits(logits: torch.Tensor, step: int, seqs: list[list[int]], done: list[bool]) -> None:
    """Refuse to sample from NaN / +inf / all -inf logits: say which step (0 = the logits of the
    prompt pass) and which rows, at which position, produced them."""
    bad = {r: what for r, what in ops.nonfinite_logit_rows(logits).items() if not done[r]}
    if bad:
        from gptfast.errors import NonFiniteError

        rows = "; ".join(f"row {r} after {len(seqs[r])} tokens: {what}" for r, what in list(bad.items())[:8])
        raise NonFiniteError(
            f"generate: the model produced non-finite logits at step {step} "
            f"({'the prompt pass' if step == 0 else f'decode step {step}'}) -- {rows}. "
            "The weights or activations overflowed or hold NaN (try --dtype fp32, check the checkpoint)"
        )


def stream(
    model,
    prompts,
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    eot_token: int | None = None,
    return_logprobs: bool = False,
    overflow: str = "slide",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    compile: bool = False,
    stats: dict | None = None,
    weight_dtype: str | torch.dtype | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position as tokens are produced (arguments as `generate`)."""
    return _run(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                generator, eot_token, return_logprobs, overflow, dtype, backend, compile, stats, weight_dtype)


def _run(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
         generator, eot_token, return_logprobs, overflow, dtype, backend, compile, stats,
         weight_dtype=None) -> Iterator[Step]:
    # --- validate once, here (the step functions call backends directly) ---
    rows_tokens = _as_prompt_lists(prompts)
    B = len(rows_tokens)
    cfg = model.config
    for i, p in enumerate(rows_tokens):
        if not p:
            raise InputError(f"generate: prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"generate: prompts[{i}] holds token id {bad[0]} outside [0, {cfg.vocab_size})")
    n_new = _per_row(max_new_tokens, B, "max_new_tokens")
    _check_sampling(temperature, top_k, top_p, repetition_penalty)
    if overflow not in ("slide", "error"):
        raise InputError(f"generate: overflow must be 'slide' or 'error', got {overflow!r}")
    if eot_token is not None and not (isinstance(eot_token, int) and 0 <= eot_token < cfg.vocab_size):
        raise InputError(f"generate: eot_token must be a token id in [0, {cfg.vocab_size}) or None, got {eot_token!r}")
    device = model.transformer.wte.weight.device
    gens: list[torch.Generator | None]
    if generator is not None and seed is not None:
        raise InputError("generate: pass either seed or generator, not both")
    if isinstance(seed, (list, tuple)):
        if len(seed) != B:
            raise InputError(f"generate: seed list must have one seed per prompt ({B}), got {len(seed)}")
        gens = []
        for s in seed:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            gens.append(g)
    elif seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"generate: seed must be an int, a list of ints or None, got {seed!r}")
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens = [g]
    else:
        gens = [generator]
    bs = cfg.block_size
    P = [len(p) for p in rows_tokens]
    need = max(p + n - 1 for p, n in zip(P, n_new))  # positions fed to the model, per the longest row
    if overflow == "error" and need > bs:
        b = max(range(B), key=lambda i: P[i] + n_new[i])
        raise InputError(
            f"generate: prompt length {P[b]} + max_new_tokens {n_new[b]} needs {P[b] + n_new[b] - 1} "
            f"positions, more than the model's block_size {bs}; shorten the prompt or pass overflow='slide'"
        )
    wdtype = _as_dtype(dtype) or model.transformer.wte.weight.dtype
    mdtype = _as_weight_dtype(weight_dtype, wdtype, device.type)
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    fns = resolve_ops(backend if backend is not None else getattr(model, "backend", None),
                      device.type, wdtype, D, cfg.n_embd)
    fns.skinny, fns.skinny_max_m = _skinny_for(fns, device.type, wdtype)
    if mdtype is not None and fns.skinny is None:
        raise InputError(f"generate: weight_dtype='bf16' needs the native CPU kernels (they read bf16 weights); "
                         f"the ops resolved to {fns.names}")
    # With the skinny kernel the (out, in) nn.Linear weights are what decoding wants: no copies
    # (the prompt pass, a real GEMM, runs as fast on transposed views).
    w = decode_weights(model, wdtype, _NO_COPY_LAYOUT if fns.skinny is not None else None, mdtype)
    pre_fn, dec_fn = (_compiled_fns(model, device.type) if compile else (prefill, decode_one_token))
    # Native CPU, few rows: the whole step as one op (no Python between kernels), unless the
    # caller asked for torch.compile, which then compiles the Python step.
    fused = None if compile or B > fns.skinny_max_m or not FUSED_STEP else fused_step_args(w, fns, device.type)

    # --- static state: the KV cache and the token buffer ---
    P0 = [min(p, bs) for p in P]  # prompts longer than the block are cropped, as the reference does
    T_max = max(max(P0), min(need, bs))
    # zeros, not empty: a backend may multiply masked-out (zero-probability) slots by their values
    k_cache = [torch.zeros(B, H, T_max, D, device=device, dtype=wdtype) for _ in range(cfg.n_layer)]
    v_cache = [torch.zeros_like(k) for k in k_cache]
    if compile and device.type == "cuda":
        for t in k_cache + v_cache:
            torch._dynamo.mark_static_address(t)
    seqs = [list(p) for p in rows_tokens]  # host copy of every row (prompt + generated)
    count = [0] * B
    done = [n == 0 for n in n_new]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(rows_tokens):
            seen[i, torch.tensor(p, device=device)] = True

    t0 = time.perf_counter()
    with torch.inference_mode():
        Tp = max(P0)
        toks = torch.zeros(B, Tp, dtype=torch.long)
        for i, p in enumerate(rows_tokens):
            toks[i, : P0[i]] = torch.tensor(p[-P0[i]:])
        lens = torch.tensor(P0, dtype=torch.long, device=device)
        logits = pre_fn(w, fns, k_cache, v_cache, toks.to(device), lens)  # (B, V)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t0
        steps = 0
        while not all(done):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                _check_step_logits(logits, steps, seqs, done)
            if len(gens) == 1:
                nxt = fns.sample(logits, float(temperature), top_k, top_p, gens[0])  # (B,)
            else:  # one generator per row: row b's draws do not depend on the rest of the batch
                nxt = torch.cat([fns.sample(logits[i:i + 1], float(temperature), top_k, top_p, gens[i])
                                 for i in range(B)])
            lp = token_logprobs(logits, temperature, nxt).tolist() if return_logprobs else None
            nxt_l = nxt.tolist()
            out_t: list[int | None] = [None] * B
            out_lp: list[float | None] | None = [None] * B if return_logprobs else None
            for i in range(B):
                if done[i]:
                    continue
                t = nxt_l[i]
                seqs[i].append(t)
                count[i] += 1
                out_t[i] = t
                if out_lp is not None:
                    out_lp[i] = lp[i]
                if (eot_token is not None and t == eot_token) or count[i] >= n_new[i]:
                    done[i] = True
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            steps += 1
            yield Step(out_t, out_lp)
            if all(done):
                break
            # --- next logits: feed each row's newest token at its own position ---
            pos_l = [len(s) - 1 for s in seqs]
            slide = [i for i in range(B) if not done[i] and pos_l[i] >= bs]
            pos = torch.tensor([min(p, T_max - 1) for p in pos_l], dtype=torch.long, device=device)
            if fused is not None:
                logits = decode_one_token_fused(fused, k_cache, v_cache, nxt.to(device), pos)
            else:
                logits = dec_fn(w, fns, k_cache, v_cache, nxt.to(device), pos)
            if slide:
                # overflow="slide": the reference crops the context to the last block_size tokens,
                # which moves every token to a new absolute position (position embeddings restart
                # at 0 for the window), so every cached K/V is stale. A rolling cache would keep
                # the old positions and NOT match; re-running the window (a prefill of block_size
                # tokens, the reference's own cost) does. The decode step above wrote garbage at
                # the last slot of these rows; the prefill overwrites their whole cache.
                win = torch.tensor([seqs[i][-bs:] for i in slide], dtype=torch.long, device=device)
                rows = torch.tensor(slide, dtype=torch.long, device=device)
                logits = logits.clone()
                logits[rows] = pre_fn(w, fns, k_cache, v_cache, win,
                                      torch.full((len(slide),), bs, dtype=torch.long, device=device), rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
    if stats is not None:
        total = time.perf_counter() - t0
        stats.update(prefill_s=t_prefill, decode_s=total - t_prefill, steps=steps,
                     new_tokens=sum(count), total_s=total, backends=dict(fns.names),
                     weight_copy_bytes=w.copied_bytes, dtype=str(wdtype).replace("torch.", ""),
                     weight_dtype=str(w.weight_dtype or wdtype).replace("torch.", ""),
                     decode_step="native fused" if fused is not None else ("compiled" if compile else "python"))


def generate(
    model,
    prompts,
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] | None = None,
    eot_token: int | None = None,
    return_logprobs: bool = False,
    *,
    generator: torch.Generator | None = None,
    overflow: str = "slide",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    compile: bool = False,
    stats: dict | None = None,
    weight_dtype: str | torch.dtype | None = None,
):
    """KV-cached generation for a batch of prompts of any lengths.

    model: a `gptfast.GPT` (its weights and op backend are used; the model is not modified).
    prompts: list of B token-id lists (lengths may differ) or a (B, T) int64 tensor.
    max_new_tokens: int, or one int per row (each row stops at its own limit).
    temperature (0 = greedy), top_k, top_p: as `gptfast.ops.sample` (temperature, then top-k,
    then top-p). repetition_penalty: CTRL penalty (1.0 = off) applied to the logits first, over
    every token already in the row (prompt included), as Hugging Face does.
    seed: None (global RNG), an int (one generator for the whole batch, drawing one uniform per
    row per step as `ops.sample` does, so batch == `generate_reference(seed=...)` on the same
    batch), or a list of B ints (row b draws from its own generator seeded seeds[b]: row b then
    gets exactly the tokens it gets when generated alone with seed=seeds[b]). generator: an
    explicit `torch.Generator` for the batch instead of seed.
    eot_token: a row that samples it stops (the token is included in its output).
    return_logprobs: also return per-token log-probs (see `token_logprobs`: log-softmax of the
    penalised, temperature-scaled logits, before top-k/top-p truncation).
    overflow: what happens when prompt + new tokens exceed the block size. "slide" (default):
    the context is cropped to the last block_size tokens, exactly as `generate_reference`; every
    token past the block size costs one prefill of block_size tokens (see `_run`). "error": a
    ValueError naming the lengths before anything runs.
    dtype: None (the model's), "fp32", "bf16" or "fp16": weights, activations and cache dtype
    (logits and sampling stay fp32). backend: op backend (default: the model's).
    weight_dtype: None, or "bf16" on CPU with fp32 activations: the matrices (and the tied
    wte / LM head) are held as bf16 copies that the native kernels widen exactly and accumulate
    in fp32, so a memory-bound step streams half the bytes (everything else stays fp32; see the
    README for its measured speed and accuracy). Needs the native CPU backend.
    compile: torch.compile the decode step (CUDA: CUDA graphs via mode="reduce-overhead").
    stats: a dict filled with timings (prefill_s, decode_s, steps, new_tokens, backends, ...).

    Returns a list of B lists of new token ids (each ends at its eot or its limit), and with
    return_logprobs a second list of B lists of floats.
    """
    toks: list[list[int]] = []
    lps: list[list[float]] = []
    for step in stream(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                       seed, generator, eot_token, return_logprobs, overflow, dtype, backend, compile, stats,
                       weight_dtype):
        if not toks:
            toks = [[] for _ in step.tokens]
            lps = [[] for _ in step.tokens]
        for i, t in enumerate(step.tokens):
            if t is not None:
                toks[i].append(t)
                if return_logprobs:
                    lps[i].append(step.logprobs[i])
    if not toks:  # max_new_tokens 0 everywhere
        n = len(_as_prompt_lists(prompts))
        toks, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    return (toks, lps) if return_logprobs else toks


def generate_tensor(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, **kwargs) -> torch.Tensor:
    """`GPT.generate`'s contract on the engine: idx (B, T) int64 -> (B, T + n) int64.

    Rows that stopped at `eot_token` are padded with it; n is the longest row's count (as
    `generate_reference`, which stops once every row has finished).
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise InputError(f"generate: idx must be (B, T) int64, got {idx.dtype} {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise InputError("generate: idx must hold at least one token per row (got T=0)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    rows = generate(model, idx, max_new_tokens, temperature, top_k, top_p, **kwargs)
    n = max(len(r) for r in rows)
    eot = kwargs.get("eot_token")
    new = torch.full((idx.shape[0], n), eot if eot is not None else 0, dtype=torch.long)
    for i, r in enumerate(rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat([idx, new.to(idx.device)], dim=1)
