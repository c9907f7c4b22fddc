"""The reference ops are the truth for every backend: check them against independent math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast.ops import reference


def test_layer_norm_matches_torch_and_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, biased var 1.25 -> (x - 2.5) / sqrt(1.25 + eps)
    expected = (x - 2.5) / math.sqrt(1.25 + 1e-5)
    torch.testing.assert_close(reference.layer_norm(x, None, None, 1e-5), expected)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, generator=g)
    w, b = torch.randn(33, generator=g), torch.randn(33, generator=g)
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5))


def test_gelu_tanh_and_mlp_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g)
    w1, b1 = torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    w2, b2 = torch.randn(16, 40, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(reference.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    expected = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
    torch.testing.assert_close(reference.gelu_mlp(x, w1, b1, w2, b2), expected, rtol=1e-5, atol=1e-5)


def test_causal_attention_first_row_attends_only_to_itself():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    out = reference.causal_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    # The last row is a softmax-weighted mean of every value row.
    w = torch.softmax(q[:, :, -1:] @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out[:, :, -1:], w @ v)


def test_decode_attention_equals_last_rows_of_causal_attention():
    g = torch.Generator().manual_seed(0)
    B, H, T_max, D = 3, 2, 12, 8
    lens = torch.tensor([5, 12, 9])
    k_cache, v_cache = torch.randn(B, H, T_max, D, generator=g), torch.randn(B, H, T_max, D, generator=g)
    q_full = torch.randn(B, H, T_max, D, generator=g)
    Tq = 2
    q = torch.stack([q_full[b, :, lens[b] - Tq : lens[b]] for b in range(B)])
    # Poison the unused cache tail: it must never be read.
    for b in range(B):
        k_cache[b, :, lens[b]:] = float("nan")
        v_cache[b, :, lens[b]:] = float("inf")
    out = reference.decode_attention(q, k_cache, v_cache, lens)
    for b in range(B):
        L = int(lens[b])
        full = reference.causal_attention(q_full[b:b+1, :, :L], k_cache[b:b+1, :, :L], v_cache[b:b+1, :, :L])
        torch.testing.assert_close(out[b], full[0, :, L - Tq : L])


def _kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs[0] > 0).flatten().tolist())


def test_sampling_filter_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    assert _kept(reference.sampling_filter(logits, 1.0, top_k=2)) == {1, 2, 3}
    assert _kept(reference.sampling_filter(logits, 1.0, top_k=1)) == {1}


def test_sampling_filter_top_p_hand_example():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    logits = probs.log()
    # Descending 0.4, 0.3, 0.2, 0.1; cumulative 0.4, 0.7, 0.9, 1.0.
    assert _kept(reference.sampling_filter(logits, 1.0, top_p=0.4)) == {1}
    assert _kept(reference.sampling_filter(logits, 1.0, top_p=0.5)) == {1, 3}
    assert _kept(reference.sampling_filter(logits, 1.0, top_p=0.85)) == {1, 2, 3}
    assert _kept(reference.sampling_filter(logits, 1.0, top_p=1.0)) == {0, 1, 2, 3}
    kept = reference.sampling_filter(logits, 1.0, top_p=0.5)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))


def test_sampling_filter_temperature():
    logits = torch.tensor([[0.0, 1.0]])
    p = reference.sampling_filter(logits, 0.5)
    torch.testing.assert_close(p, torch.softmax(logits / 0.5, -1))


def test_sample_greedy_and_inverse_cdf_rule():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert reference.sample(logits, 0.0).tolist() == [1, 0]
    # With a known uniform the inverse-CDF pick is predictable.
    g = torch.Generator().manual_seed(123)
    u = torch.rand(2, generator=torch.Generator().manual_seed(123))
    probs = torch.softmax(logits, -1)
    cdf = probs.cumsum(-1)
    expected = [int((cdf[r] <= u[r] * cdf[r, -1]).sum()) for r in range(2)]
    assert reference.sample(logits, 1.0, generator=g).tolist() == expected


def test_sample_never_picks_filtered_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=g)
    allowed = reference.sampling_filter(logits, 0.7, top_k=5, top_p=0.8) > 0
    for _ in range(20):
        tok = reference.sample(logits, 0.7, top_k=5, top_p=0.8, generator=g)
        assert allowed[torch.arange(64), tok].all()
