"""Fused temperature / top-k / top-p sampling without sorting the vocabulary (Triton).

Rule (exactly `gptfast.ops.reference.sample`): x = logits / temperature; top-k keeps tokens with
fewer than k tokens strictly above them; top-p keeps, among those, tokens whose strictly-higher
probability mass is < top_p; then with the caller's uniform u (one per row, drawn as
`torch.rand(B, generator=...)`) the token is the first, in vocabulary order, whose cumulative
kept probability exceeds u * total (inverse CDF), falling back to the last kept token.

Algorithm: both filters are "keep x_i iff F(x_i) < thresh" with a non-increasing
F(t) = sum_{x_j > t} w_j (w = 1, thresh = k for top-k; w = exp(x - max), thresh = top_p * Z for
top-p). The kept set is therefore {x >= tau} with tau the smallest *actual* logit satisfying the
test, found by a pivot search on the logit value: each pass over the row evaluates F at 8 pivots
spread between the smallest and largest candidate values left, then snaps the bracket to actual
values, so the search stops exactly when one candidate remains (no sort, no (B, V) temporary).
Simulated on GPT-2-sized rows (V = 50257, randn * 3.75): 5-6 passes for top-k=50, 3-5 for
top-p=0.9 (bisection with one pivot needs 11-13 and 7-8), plus 4 fixed passes (max, top-p
normaliser, kept total, inverse-CDF scan). This is the "sorting-free" idea of FlashInfer's top-k/top-p
sampling kernels (Ye et al., "FlashInfer", 2025, and the FlashInfer blog post "Sorting-Free
GPU Kernels for LLM Sampling", 2025), which pivot on the probability value; FlashInfer uses
rejection sampling with a random pivot, we use a deterministic pivot search so that the draw matches
the sort-based reference token-for-token (up to fp rounding at a boundary).

Trade-off: one program per row (a row of GPT-2's 50257 logits is 200 KB, re-read from L2 on every
pass); for batch 1 decoding only one SM works (splitting a row over programs would need a
cross-program reduction per pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gptfast.kernels._common import INTERPRET, check_cuda_or_interpret

MAX_SEARCH_STEPS = tl.constexpr(128)  # passes cap: each shrinks the value bracket 8x AND drops >= 1 candidate


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_x(L_row, offs, V, temperature):
    # Padding lanes read -inf: never kept, zero weight.
    return tl.load(L_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) / temperature


@triton.jit
def _bracket(L_row, V, temperature, floor, lo, hi, BLOCK_V: tl.constexpr):
    """(min, max) of the kept logits (x >= floor) strictly inside (lo, hi); (+inf, -inf) if none."""
    mn = tl.full([BLOCK_V], float("inf"), tl.float32)
    mx = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(L_row, v0 + tl.arange(0, BLOCK_V), V, temperature)
        inside = (x >= floor) & (x > lo) & (x < hi)
        mn = tl.minimum(mn, tl.where(inside, x, float("inf")))
        mx = tl.maximum(mx, tl.where(inside, x, float("-inf")))
    return tl.min(mn, 0), tl.max(mx, 0)


@triton.jit
def _threshold(
    L_row, V, temperature,
    floor,                   # tokens below it are already filtered out
    x_max,                   # row max (always kept)
    thresh,                  # keep x_i iff F(x_i) < thresh
    WEIGHTED: tl.constexpr,  # w_j = exp(x_j - x_max) (top-p) instead of 1 (top-k)
    NUM_PIVOTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Smallest actual logit tau with F(tau) < thresh, F(t) = sum over kept x_j > t of w_j.

    Candidates are the kept logits strictly inside (lo, hi), where F(lo) >= thresh (or lo = -inf)
    and hi is an actual logit with F(hi) < thresh. Each pass evaluates F at NUM_PIVOTS pivots
    spread over [min, max] of the candidates (pivot 0 is the smallest candidate itself) and, in the
    same read, the min/max of the candidates in each gap between pivots, so the next bracket is
    known without another pass. The bracket shrinks NUM_PIVOTS-fold per pass and loses at least
    its smallest candidate, so the loop ends exactly when one value is left.
    """
    lo = tl.full([], float("-inf"), tl.float32)
    hi = x_max
    s_min, s_max = _bracket(L_row, V, temperature, floor, lo, hi, BLOCK_V)
    cols = tl.arange(0, NUM_PIVOTS)
    step = 0
    while (s_min <= s_max) & (step < MAX_SEARCH_STEPS):
        piv = s_min + (s_max - s_min) * (cols.to(tl.float32) / NUM_PIVOTS)  # (P,), piv[0] = s_min
        piv = tl.minimum(piv, s_max)
        f = tl.zeros([NUM_PIVOTS], tl.float32)
        snap = tl.full([NUM_PIVOTS], float("inf"), tl.float32)    # min kept x >= piv[j]
        gap_min = tl.full([NUM_PIVOTS], float("inf"), tl.float32)  # candidates in (piv[j], piv[j+1])
        gap_max = tl.full([NUM_PIVOTS], float("-inf"), tl.float32)  # (last gap: (piv[P-1], hi))
        for v0 in range(0, V, BLOCK_V):
            x = _load_x(L_row, v0 + tl.arange(0, BLOCK_V), V, temperature)
            kept = x >= floor
            xb = x[:, None]                                  # (BLOCK_V, 1)
            gt = kept[:, None] & (xb > piv[None, :])         # (BLOCK_V, P)
            if WEIGHTED:
                w = tl.exp(x - x_max)[:, None]
            else:
                w = tl.full([BLOCK_V, 1], 1.0, tl.float32)
            f += tl.sum(tl.where(gt, w, 0.0), 0)
            ge = kept[:, None] & (xb >= piv[None, :])
            snap = tl.minimum(snap, tl.min(tl.where(ge, xb, float("inf")), 0))
            # Gap index of x: (number of pivots below x) - 1; x equal to a pivot is in no gap.
            n_below = tl.sum(gt.to(tl.int32), 1)
            on_pivot = tl.max((xb == piv[None, :]).to(tl.int32), 1) > 0
            cand = kept & (x > lo) & (x < hi) & (~on_pivot) & (n_below > 0)
            in_gap = cand[:, None] & ((n_below - 1)[:, None] == cols[None, :])
            gap_min = tl.minimum(gap_min, tl.min(tl.where(in_gap, xb, float("inf")), 0))
            gap_max = tl.maximum(gap_max, tl.max(tl.where(in_gap, xb, float("-inf")), 0))
        # F is non-increasing, so the kept pivots are a suffix; j = first kept pivot (P if none).
        j = NUM_PIVOTS - tl.sum((f < thresh).to(tl.int32), 0)
        # j == 0: the smallest candidate is kept, so it is the answer: empty the bracket.
        # 0 < j <= P: answer in (piv[j-1], snap[j]]; candidates left: gap j-1.
        new_hi = tl.min(tl.where(cols == j, snap, float("inf")), 0)
        hi = tl.where(j < NUM_PIVOTS, new_hi, hi)
        lo = tl.where(j > 0, tl.max(tl.where(cols == j - 1, piv, float("-inf")), 0), lo)
        s_min = tl.where(j > 0, tl.min(tl.where(cols == j - 1, gap_min, float("inf")), 0), float("inf"))
        s_max = tl.where(j > 0, tl.max(tl.where(cols == j - 1, gap_max, float("-inf")), 0), float("-inf"))
        step += 1
    return hi


@triton.jit
def _sample_kernel(
    LOGITS,                  # (B, V), any float dtype, unit stride along V
    U,                       # (B,) fp32 uniforms in [0, 1)
    OUT,                     # (B,) int64 token ids
    stride_row,
    V,
    temperature,
    top_k,
    top_p,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    L_row = LOGITS + row.to(tl.int64) * stride_row
    # Pass 1: the row max (kept by either filter; the softmax shift).
    mx = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mx = tl.maximum(mx, _load_x(L_row, v0 + tl.arange(0, BLOCK_V), V, temperature))
    x_max = tl.max(mx, 0)

    tau = tl.full([], float("-inf"), tl.float32)
    if HAS_TOP_K:
        tau = _threshold(L_row, V, temperature, tau, x_max, top_k * 1.0, False, NUM_PIVOTS, BLOCK_V)
    if HAS_TOP_P:
        z = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = _load_x(L_row, v0 + tl.arange(0, BLOCK_V), V, temperature)
            z += tl.where(x >= tau, tl.exp(x - x_max), 0.0)
        tau = _threshold(L_row, V, temperature, tau, x_max, top_p * tl.sum(z, 0), True, NUM_PIVOTS, BLOCK_V)

    # Total kept weight, then the inverse-CDF scan in vocabulary order.
    w_sum = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = _load_x(L_row, v0 + tl.arange(0, BLOCK_V), V, temperature)
        w_sum += tl.where(x >= tau, tl.exp(x - x_max), 0.0)
    target = tl.load(U + row) * tl.sum(w_sum, 0)
    carry = tl.zeros([], tl.float32)
    first = tl.full([], 2147483647, tl.int32)  # first index whose cumulative weight > target
    last_kept = tl.full([], -1, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = _load_x(L_row, offs, V, temperature)
        kept = (x >= tau) & (offs < V)
        w = tl.where(kept, tl.exp(x - x_max), 0.0)
        cdf = carry + tl.cumsum(w, 0)
        first = tl.minimum(first, tl.min(tl.where((cdf > target) & (offs < V), offs, 2147483647), 0))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept, offs, -1), 0))
        carry += tl.sum(w, 0)
    # Rounding can leave u * total at the very end of the CDF: fall back to the last kept token.
    tl.store(OUT + row, tl.minimum(first, last_kept).to(tl.int64))


# ----------------------------------------------------------------------------- launcher + public


@triton_op("gptfast_triton::sample_from_uniform", mutates_args=())
def sample_from_uniform(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """(B,) int64 tokens for (B, V) logits and (B,) fp32 uniforms; top_k = 0 / top_p = 1 mean off."""
    check_cuda_or_interpret("sample", logits, u)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty((B,), dtype=torch.int64, device=logits.device)
    block = min(triton.next_power_of_2(V), 64 if INTERPRET else 2048)
    has_k = 0 < top_k < V
    has_p = top_p < 1.0
    if B > 0:
        wrap_triton(_sample_kernel)[(B,)](
            logits, u, out, logits.stride(0), V, temperature, max(top_k, 1), top_p,
            HAS_TOP_K=has_k, HAS_TOP_P=has_p, NUM_PIVOTS=8, BLOCK_V=block, num_warps=1 if INTERPRET else 8,
        )
    return out


@sample_from_uniform.register_fake
def _(logits, u, temperature, top_k, top_p):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    uniform: torch.Tensor | None,
) -> torch.Tensor:
    """One token per row of logits (B, V) (any float dtype); returns (B,) int64.

    temperature 0 = greedy (argmax, done by torch: a single reduction needs no custom kernel).
    Otherwise `uniform` holds the (B,) fp32 draws in [0, 1) that the dispatch layer made
    (`gptfast.ops.draw_uniform`: torch.rand(B, generator=...), the same for every backend), so the
    tokens match the reference's for the same seed.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if uniform is None or tuple(uniform.shape) != (logits.shape[0],):
        got = None if uniform is None else tuple(uniform.shape)
        raise ValueError(
            f"sample: uniform must be a ({logits.shape[0]},) tensor of draws for temperature > 0, got {got}"
        )
    return torch.ops.gptfast_triton.sample_from_uniform(
        logits, uniform, float(temperature), 0 if top_k is None else int(top_k),
        1.0 if top_p is None else float(top_p),
    )
