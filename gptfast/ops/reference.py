"""Reference implementations of gptfast's hot ops: readable pure PyTorch, the truth.

Every other backend (`torch`, `native`, `triton`) is tested against these functions. They favour
clarity over speed: attention materialises the full (T, T) score matrix, LayerNorm computes mean
and variance explicitly, sampling sorts the vocabulary. Reductions run in fp32 (or the input
dtype if wider) and results are cast back to the input dtype; autograd provides the backward.

Shapes use B = batch, H = heads, T = sequence length, D = head dim, C = model width, V = vocab.

Non-finite inputs (one contract for every backend; tests/test_nonfinite.py): for
`causal_attention`, `layer_norm`, `gelu_mlp` and `decode_attention`, an output element is
non-finite exactly where these functions' IEEE arithmetic (in fp64) makes it non-finite: a NaN or
+-inf in an input propagates and is never silently turned into a finite number, and finite outputs
keep their values. Consequences worth knowing: a NaN or +-inf anywhere in a row of q (attention)
or x (LayerNorm, MLP) makes that whole output row non-finite; a score row that is all -inf (e.g.
a -inf in k against a positive q, as the only visible key) is NaN, not 0; a NaN in v poisons
every row whose probabilities multiply it, including masked (probability 0) ones, because
0 * NaN = NaN. Which of NaN / +-inf appears is not specified. `sample` refuses logits rows that
hold a NaN or +inf or no finite value (`gptfast.ops.check_logits`); -inf bans a token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def availability(device_type: str) -> str | None:
    """Backend protocol: None = usable on this device type, else the reason it is not."""
    return None


def unsupported(op: str, **call) -> str | None:
    """Backend protocol: None = this call is supported, else the reason (e.g. a head dim)."""
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the dtype itself (fp64 stays fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v.

    q, k, v: (B, H, T, D). Returns (B, H, T, D) in q's dtype. `scale` defaults to 1/sqrt(D).
    `dropout_p` > 0 drops attention probabilities (as in GPT-2 training); pass 0 at inference.
    """
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    att = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p, training=True)
    return (att @ v.to(acc)).to(q.dtype)  # (B, H, T, D)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The causal attention probability matrix, (B, H, T, T) in fp32: rows sum to 1, upper triangle 0."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    att = (q.float() @ k.float().transpose(-2, -1)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance, as GPT-2).

    x: (..., N); weight, bias: (N,) or None. Returns x's shape and dtype.
    """
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), the one GPT-2 uses."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU, exact: x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016; what
    `torch.nn.GELU()` and nanoGPT compute)."""
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_mlp(
    x: torch.Tensor,
    w_fc: torch.Tensor,
    b_fc: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    activation: str = "gelu_tanh",
) -> torch.Tensor:
    """GPT-2's MLP: gelu(x w_fc^T + b_fc) w_proj^T + b_proj.

    x: (..., C); w_fc: (F, C); b_fc: (F,) or None; w_proj: (C_out, F); b_proj: (C_out,) or None.
    Weights use `nn.Linear`'s (out, in) layout, x's dtype or bfloat16 with float32 x (weight-only
    bf16: widened exactly, fp32 math). activation: "gelu_tanh" (`gelu_tanh`) or "gelu"
    (`gelu_exact`). Returns (..., C_out) in x's dtype.
    """
    w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)  # no-ops unless weight-only bf16
    h = x @ w_fc.t()  # (..., F)
    if b_fc is not None:
        h = h + b_fc
    h = gelu_exact(h) if activation == "gelu" else gelu_tanh(h)
    y = h @ w_proj.t()  # (..., C_out)
    if b_proj is not None:
        y = y + b_proj
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x weight^T + bias (`nn.Linear`): x (..., K); weight (N, K) in x's dtype, or bfloat16 with
    float32 x (weight-only bf16: widened exactly, so the result is fp32 math on the bf16 weight);
    bias (N,) or None. Returns (..., N) in x's dtype."""
    y = x @ weight.to(x.dtype).t()  # (..., N)
    if bias is not None:
        y = y + bias
    return y


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
    """x w^T + bias with w = `quant.dequantize_weight(qweight, scale, zero, bits, group_size)` in
    x's dtype (the formats: `gptfast.ops.quant`). x (..., K) -> (..., N) in x's dtype. Weight-only
    math: `act_int8` (a native CPU option) is ignored."""
    from gptfast.ops.quant import dequantize_weight

    w = dequantize_weight(qweight, scale, zero, bits, group_size, x.dtype)  # (N, K)
    y = x @ w.t()  # (..., N)
    if bias is not None:
        y = y + bias
    return y


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a few new query tokens against a preallocated KV cache.

    q: (B, H, Tq, D), the queries of the last Tq tokens of each sequence.
    k_cache, v_cache: (B, H, T_max, D); positions >= cache_lens[b] hold garbage and are never read.
    cache_lens: (B,) integer tensor: valid cache length of each sequence, *including* the Tq new
    tokens (already written to the cache). Query i of sequence b sits at position
    cache_lens[b] - Tq + i and attends to cache positions 0 .. cache_lens[b] - Tq + i.
    Returns (B, H, Tq, D) in q's dtype.
    """
    B, H, Tq, D = q.shape
    T_max = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    scores = (q.to(acc) @ k_cache.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, T_max)
    lens = cache_lens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
    q_pos = lens - Tq + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    k_pos = torch.arange(T_max, device=q.device).view(1, 1, 1, T_max)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Garbage past the valid length may be inf/nan: zero it so 0 * garbage cannot poison the sum.
    v_valid = v_cache.to(acc).masked_fill((k_pos >= lens).view(B, 1, T_max, 1), 0.0)
    return (probs @ v_valid).to(q.dtype)


def sampling_filter(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The renormalised distribution `sample` draws from, (B, V) fp32; tokens not kept are 0.

    Order (as Hugging Face's logits warpers): temperature, then top-k, then top-p.
    - top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept,
      as nanoGPT's `logits[logits < v[:, [-1]]] = -inf`).
    - top-p (nucleus, Holtzman et al. 2019) keeps every token whose probability is >= that of the
      token at which the descending cumulative probability first reaches top_p. Equivalently token
      i is kept iff the total probability of tokens strictly more likely than i is < top_p: a
      definition that does not depend on how ties are ordered, so it can be computed without a sort.
    """
    V = logits.shape[-1]
    x = logits.float() / temperature
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        cum = sorted_probs.cumsum(dim=-1)
        # First position where the cumulative sum reaches top_p (clamped: rounding may leave the
        # total a hair below top_p, in which case every token is kept).
        cut = (cum < top_p).sum(dim=-1, keepdim=True).clamp(max=V - 1)
        threshold = sorted_probs.gather(-1, cut)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw_uniform(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """The one random-draw rule of `sample`: one uniform per row of `logits` (B, V),
    `torch.rand(B, generator=generator)` in fp32 on the logits' device, or None (no draw, the
    generator untouched) for temperature 0. `gptfast.ops.sample` draws with it once per call and
    hands the draws to whichever backend samples (`gptfast.ops.draw_uniform` is this function)."""
    if temperature == 0.0:
        return None
    return torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float32)


def as_uniform(
    logits: torch.Tensor,
    temperature: float,
    uniform: torch.Tensor | torch.Generator | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """A backend `sample`'s `uniform` argument as draws: given (from the dispatch layer), else drawn
    by `draw_uniform` from `generator` (a direct call may pass a generator, also where `uniform`
    goes, as the backends' signature had it before the draw moved into the dispatch layer)."""
    if isinstance(uniform, torch.Generator):
        uniform, generator = None, uniform
    if uniform is None:
        uniform = draw_uniform(logits, temperature, generator)
    return uniform


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    uniform: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of `logits` (B, V); returns (B,) int64.

    temperature == 0 means greedy (argmax). Otherwise every backend draws with the same rule, so
    they agree token-for-token given the same draws: one uniform u per row (`uniform`, (B,) fp32 in
    [0, 1), made by `draw_uniform`: `torch.rand(B, generator=generator)`; drawn here when not
    given), then the first token (in vocabulary order) whose cumulative kept probability exceeds
    u (inverse-CDF sampling).
    """
    uniform = as_uniform(logits, temperature, uniform, generator)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_filter(logits, temperature, top_k, top_p)
    return _inverse_cdf(probs, uniform)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability (of the kept, unnormalised `probs`) exceeds
    u * total, per row: (B, V), (B,) -> (B,) int64."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can push u * total onto the very end of the CDF: fall back to the last kept token.
    last_kept = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last_kept)
