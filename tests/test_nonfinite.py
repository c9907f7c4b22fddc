"""The NaN / inf contract (issue #19), the same on every backend.

Contract (written in `gptfast.ops.reference`'s docstring): for causal_attention, layer_norm,
gelu_mlp and decode_attention, an output element is non-finite exactly where the reference's
IEEE arithmetic makes it non-finite -- a NaN or +-inf in an input propagates, is never silently
turned into a finite number, and finite rows stay finite. In particular a NaN or +-inf anywhere
in a row of q (attention) or x (layer_norm, gelu_mlp) makes that whole output row non-finite.
`sample` refuses a row with a NaN, a +inf or no finite logit, naming the rows.
"""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.errors import NonFiniteError
from gptfast.ops import reference
from tests.helpers import available_backends

VALUES = (float("nan"), float("inf"), float("-inf"))


def _poison(t: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    for _ in range(n):
        i = int(torch.randint(flat.numel(), (1,), generator=gen))
        flat[i] = VALUES[int(torch.randint(3, (1,), generator=gen))]
    return t


def _same_nonfinite(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    a, r = ~torch.isfinite(out), ~torch.isfinite(ref)
    diff = (a != r).nonzero()
    assert len(diff) == 0, (f"{what}: non-finite pattern differs from the reference at {diff[:6].tolist()} "
                            f"(backend non-finite: {a[tuple(diff[:6].T)].tolist()})")
    fin = ~r
    if fin.any():  # the finite part still computes the same function
        torch.testing.assert_close(out[fin].double(), ref[fin].double(), atol=1e-4, rtol=1e-4)


CASES = [(which, seed) for which in ("q", "k", "v") for seed in range(6)]


@pytest.mark.parametrize("backend", available_backends("causal_attention", dtype=torch.float32, head_dim=16,
                                                      dropout_p=0.0))
@pytest.mark.parametrize("which, seed", CASES)
def test_causal_attention_nonfinite(backend, which, seed):
    """Issue #19: one NaN in q gave no NaN on `torch` but a NaN row on reference / native."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    inputs[which] = _poison(inputs[which], g, 1 + seed % 3)
    ref = reference.causal_attention(*(t.double() for t in inputs.values()))
    out = ops.causal_attention(*inputs.values(), backend=backend)
    _same_nonfinite(out, ref, f"{backend} {which} seed {seed}")
    if which == "q":  # the rule spelled out: a poisoned q row -> that whole output row non-finite
        bad_rows = ~torch.isfinite(inputs["q"]).all(-1)
        assert (~torch.isfinite(out)).all(-1)[bad_rows].all()


@pytest.mark.parametrize("backend", available_backends("layer_norm", dtype=torch.float32, n=32))
@pytest.mark.parametrize("seed", range(6))
def test_layer_norm_nonfinite(backend, seed):
    g = torch.Generator().manual_seed(seed)
    x = _poison(torch.randn(6, 32, generator=g), g, 1 + seed % 3)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    ref = reference.layer_norm(x.double(), w.double(), b.double(), 1e-5)
    out = ops.layer_norm(x, w, b, backend=backend)
    _same_nonfinite(out, ref, f"{backend} seed {seed}")
    assert (~torch.isfinite(out)).all(-1)[~torch.isfinite(x).all(-1)].all()


@pytest.mark.parametrize("backend", available_backends("gelu_mlp", dtype=torch.float32))
@pytest.mark.parametrize("seed", range(6))
def test_gelu_mlp_nonfinite(backend, seed):
    g = torch.Generator().manual_seed(seed)
    x = _poison(torch.randn(5, 16, generator=g), g, 1 + seed % 3)
    wf, bf = torch.randn(64, 16, generator=g), torch.randn(64, generator=g)
    wp, bp = torch.randn(16, 64, generator=g), torch.randn(16, generator=g)
    ref = reference.gelu_mlp(*(t.double() for t in (x, wf, bf, wp, bp)))
    out = ops.gelu_mlp(x, wf, bf, wp, bp, backend=backend)
    _same_nonfinite(out, ref, f"{backend} seed {seed}")
    assert (~torch.isfinite(out)).all(-1)[~torch.isfinite(x).all(-1)].all()


@pytest.mark.parametrize("backend", available_backends("decode_attention", dtype=torch.float32, head_dim=16,
                                                      n_query=1))
@pytest.mark.parametrize("which, seed", CASES)
def test_decode_attention_nonfinite(backend, which, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 1, 16, generator=g)
    kc, vc = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    lens = torch.tensor([7, 12])
    # poison only the visible part of the cache (past cache_lens is the lead's separate fix)
    inputs = {"q": q, "k": kc, "v": vc}
    t = inputs[which]
    if which == "q":
        inputs["q"] = _poison(t, g, 1 + seed % 3)
    else:
        vis = _poison(t[:, :, :7], g, 1 + seed % 3)
        inputs[which] = torch.cat([vis, t[:, :, 7:]], 2)
    ref = reference.decode_attention(*(x.double() for x in inputs.values()), lens)
    out = ops.decode_attention(*inputs.values(), lens, backend=backend)
    _same_nonfinite(out, ref, f"{backend} {which} seed {seed}")


@pytest.mark.parametrize("backend", available_backends("sample", dtype=torch.float32, include_reference=True))
def test_sample_refuses_nonfinite_rows(backend):
    """Issue #19: all -inf / all NaN rows returned a token (reference 64, native 0), one NaN
    gave the same token for every seed. Now every backend raises, naming the rows."""
    logits = torch.randn(6, 40)
    logits[1] = float("-inf")  # no finite logit
    logits[3, 5] = float("nan")  # one NaN among normal logits
    logits[4, 7] = float("inf")
    logits[5, :30] = float("-inf")  # banned tokens, still finite ones left: fine
    with pytest.raises(NonFiniteError, match=r"3 row\(s\) \[1, 3, 4\].*row 1: no finite logit; row 3: NaN; "
                                             r"row 4: \+inf") as e:
        ops.sample(logits, 1.0, backend=backend)
    assert isinstance(e.value, ValueError)
    ok = ops.sample(logits[[0, 2, 5]], 1.0, generator=torch.Generator().manual_seed(0), backend=backend)
    assert ok[2] >= 30


def test_engine_reports_the_step_with_nonfinite_logits():
    """The generation engine names the step and the row whose logits went non-finite (here a
    NaN position embedding at position 3) instead of sampling garbage."""
    from gptfast.config import GPTConfig
    from gptfast.generation import generate
    from gptfast.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.transformer.wpe.weight[3] = float("nan")
    # The prompt itself reaches position 3: the prompt pass's logits are NaN.
    with pytest.raises(NonFiniteError, match=r"non-finite logits at step 0 \(the prompt pass\).*row 0 after 5 tokens: NaN"):
        generate(model, [[1, 2, 3, 4, 5]], 4, temperature=0)
    # Row 0 (3 tokens) feeds its first new token at position 3 on decode step 1; row 1 (2 tokens)
    # is still at position 2 then.
    with pytest.raises(NonFiniteError, match=r"at step 1 \(decode step 1\) -- row 0 after 4 tokens: NaN"):
        generate(model, [[1, 2, 3], [4, 5]], 4, temperature=0)
