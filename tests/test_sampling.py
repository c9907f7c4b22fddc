"""Sampling: native == reference token-for-token; the draws of every backend follow
`reference.sampling_filter` (chi-square) and never leave the kept set; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from gptfast import ops
from gptfast.ops import native, reference
from tests.helpers import available_backends

CONFIGS = [(1.0, None, None), (0.8, 50, None), (1.0, None, 0.9), (0.7, 200, 0.95), (1.5, None, 0.5),
           (1.0, 1, None), (0.9, 40000, 0.99), (0.0, None, None)]


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_native_matches_reference_token_for_token(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(48, 50257, generator=g) * 3
    logits[0, 123] = 1e4  # one dominant token
    logits[1, ::2] = float("-inf")  # banned tokens
    for seed in range(3):
        a = ops.sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed), backend="native")
        r = reference.sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        bad = (a != r).nonzero().flatten()
        assert len(bad) == 0, f"rows {bad[:5].tolist()}: native {a[bad[:5]].tolist()} vs reference {r[bad[:5]].tolist()}"


def test_ties_and_fp64_and_half():
    logits = torch.zeros(4, 100)  # all tied: top-k keeps every tie, top-p keeps all
    logits[2, 50:] = 1.0
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for cfg in [(1.0, 3, None), (1.0, None, 0.3), (0.0, None, None)]:
            a = native.sample(logits.to(dtype), *cfg, torch.Generator().manual_seed(1))
            r = reference.sample(logits.to(dtype), *cfg, torch.Generator().manual_seed(1))
            assert torch.equal(a, r), (dtype, cfg, a, r)


def _chi_square_pvalue_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Pearson chi-square statistic vs its critical value at p = 1e-4 (Wilson-Hilferty approximation)."""
    keep = probs > 0
    exp = probs[keep].double() * n
    stat = (((counts[keep].double() - exp) ** 2) / exp).sum().item()
    df = int(keep.sum()) - 1
    z = 3.719  # one-sided 1e-4 quantile of N(0, 1)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


# 20,000 draws: the Triton interpreter (one interpreted program per row) would take minutes, so
# triton's distribution is tested on GPU by tests/test_triton_kernels.py, not here.
@pytest.mark.parametrize("backend", [b for b in available_backends("sample", dtype=torch.float32) if b != "triton"])
@pytest.mark.parametrize("cfg", [(1.0, None, None), (0.7, 10, None), (1.0, None, 0.8), (1.3, 20, 0.9)])
def test_distribution_chi_square(backend, cfg):
    V, n = 50, 20000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 1.5
    probs = reference.sampling_filter(logits, *cfg)[0]
    draws = ops.sample(logits.expand(n, V).contiguous(), *cfg, torch.Generator().manual_seed(11), backend=backend)
    counts = torch.bincount(draws, minlength=V)
    assert counts[probs == 0].sum() == 0, f"{backend} drew tokens outside the kept set: {(counts * (probs == 0)).nonzero().flatten().tolist()}"
    stat, crit = _chi_square_pvalue_ok(counts, probs, n)
    assert stat < crit, f"{backend} {cfg}: chi-square {stat:.1f} >= critical value {crit:.1f}"


def test_generator_consumed_like_reference():
    logits = torch.randn(3, 64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in (1.0, 0.0, 0.5):
        native.sample(logits, t, None, None, g1)
        reference.sample(logits, t, None, None, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_opcheck():
    native.load_extension()
    logits = torch.randn(3, 100)
    torch.library.opcheck(torch.ops.gptfast.sample.default, (logits, 0.8, 5, 0.9, torch.rand(3)))


def test_errors():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ops.sample(logits, float("nan"), backend="native")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        ops.sample(logits, 1.0, None, 1.5, backend="native")
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ops.sample(logits, 1.0, 0, None, backend="native")
    native.load_extension()
    f = torch.ops.gptfast.sample
    with pytest.raises(RuntimeError, match="sample: temperature must be a finite number"):
        f(logits, float("nan"), 0, 1.0, torch.rand(2))
    with pytest.raises(RuntimeError, match="sample: top_p must be > 0"):
        f(logits, 1.0, 0, 0.0, torch.rand(2))
    with pytest.raises(RuntimeError, match=r"sample: uniform must have shape \(2\)"):
        f(logits, 1.0, 0, 1.0, torch.rand(3))
    with pytest.raises(RuntimeError, match=r"sample: logits must be 2-D \(B, V\)"):
        f(torch.randn(10), 1.0, 0, 1.0, torch.rand(1))
    with pytest.raises(RuntimeError, match="sample: uniform must be float32"):
        f(logits, 1.0, 0, 1.0, torch.rand(2, dtype=torch.float64))
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="sample: uniform must be on logits' device"):
        f.default.redispatch(cpu, logits, 1.0, 0, 1.0, torch.rand(2, device="meta"))


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_backends_pick_the_same_tokens_given_the_same_uniform(temperature, top_k, top_p):
    """The draw lives in the dispatch layer (ops.draw_uniform); every backend function maps the
    same explicit uniforms (ops.resolved's signature) to the reference's tokens."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 300, generator=g) * 3  # small: the Triton interpreter runs it too
    logits[1, ::3] = float("-inf")
    u = torch.rand(6, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2**-24  # the ends of [0, 1)
    uniform = None if temperature == 0.0 else u
    want = reference.sample(logits, temperature, top_k, top_p, uniform)
    for backend in available_backends("sample", dtype=torch.float32):  # native, torch, triton (interpreter)
        fn = ops.resolved("sample", "cpu", backend=backend, dtype=torch.float32)
        got = fn(logits, temperature, top_k, top_p, uniform)
        bad = (got != want).nonzero().flatten()
        assert len(bad) == 0, f"{backend} rows {bad[:5].tolist()}: {got[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"


def test_draw_uniform_is_the_one_rule():
    logits = torch.randn(5, 7)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert ops.draw_uniform(logits, 0.0, g1) is None  # greedy: no draw, generator untouched
    assert torch.equal(ops.draw_uniform(logits, 0.7, g1), torch.rand(5, generator=g2, dtype=torch.float32))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
