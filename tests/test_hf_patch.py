"""`gptfast.patch` / `gptfast.unpatch` on transformers GPT-2 models.

The truth is the same transformers model before patching (fp32): patched outputs must match it
(logits, `labels=` loss, gradients, greedy / sampled / left-padded `generate()`), the gptfast ops
must really run on the plain causal path (spied), the original attention must run where the
causal-only op cannot (padding, a filled KV cache), and `unpatch` must restore everything.
"""

from __future__ import annotations

import inspect
from types import MethodType
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402

import gptfast  # noqa: E402
from gptfast import hf_patch  # noqa: E402

# fp32; patched and original differ only in summation order (~1e-7 at these sizes).
ATOL = 1e-5
VOCAB = 300
PAD = VOCAB - 1


def make_hf(cls=GPT2LMHeadModel, attn="eager", seed=0, **overrides):
    """Random 2-layer GPT-2. initializer_range 0.1 spreads the logits so greedy decisions never
    hinge on a 1e-7 rounding difference."""
    torch.manual_seed(seed)
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64, bos_token_id=PAD,
              eos_token_id=PAD, pad_token_id=PAD, initializer_range=0.1, attn_implementation=attn)
    kw.update(overrides)
    return cls(GPT2Config(**kw)).eval()


def assert_close(got, want, atol=ATOL, what="logits"):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    if err.max() > atol:
        idx = torch.nonzero(err > atol)[:5].tolist()
        raise AssertionError(f"{what}: max |diff| {err.max():.3g} > {atol} at {idx}")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Patches made with backend=None resolve via $GPTFAST_BACKEND: `torch` here, so the tests do
    not wait for the native extension's JIT build (one test passes backend="auto" explicitly)."""
    monkeypatch.setenv("GPTFAST_BACKEND", "torch")


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the gptfast ops the patched forwards use."""
    counts = {"causal_attention": 0, "layer_norm": 0, "gelu_mlp": 0}
    for name in counts:
        real = getattr(hf_patch.ops, name)

        def wrapper(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(hf_patch.ops, name, wrapper)
    return counts


def ids_and_padded(seed=1, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on two rows
    mask[1, :1] = 0
    padded = ids.masked_fill(mask == 0, PAD)
    return ids, padded, mask


# Both mask conventions (eager: additive float mask; sdpa: None or a bool mask). Explicit
# backends: these tests check the patch, not the kernels, and must not wait for the JIT build of
# the native extension; test_generate_uses_fast_prefill_then_original_decode runs `auto`.
@pytest.mark.parametrize("attn, backend", [("eager", "reference"), ("sdpa", "torch"), ("eager", "torch")])
def test_patched_equals_unpatched(attn, backend, spy):
    hf = make_hf(attn=attn)
    ids, padded, mask = ids_and_padded()
    with torch.no_grad():
        want = hf(ids, labels=ids)
        want_pad = hf(padded, attention_mask=mask).logits
    want_greedy = hf.generate(ids[:1, :5], max_new_tokens=20, do_sample=False)
    want_left = hf.generate(padded, attention_mask=mask, max_new_tokens=20, do_sample=False)
    torch.manual_seed(123)
    want_sampled = hf.generate(ids[:2, :5], max_new_tokens=10, do_sample=True, top_k=50)

    assert gptfast.patch(hf, backend=backend) is hf
    with torch.no_grad():
        got = hf(ids, labels=ids)
    # plain causal forward: every attention, LayerNorm (2 per block + ln_f) and MLP on gptfast ops
    assert spy == {"causal_attention": 2, "layer_norm": 5, "gelu_mlp": 2}
    assert_close(got.logits, want.logits)
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-6)

    with torch.no_grad():
        got_pad = hf(padded, attention_mask=mask).logits
    assert spy["causal_attention"] == 2, "a padded batch must use the original attention"
    assert spy["layer_norm"] == 10 and spy["gelu_mlp"] == 4  # position-wise ops still patched
    # rows' padded positions are garbage in both; compare where the mask is 1
    keep = mask.bool()
    assert_close(got_pad[keep], want_pad[keep])

    assert torch.equal(hf.generate(ids[:1, :5], max_new_tokens=20, do_sample=False), want_greedy)
    assert torch.equal(hf.generate(padded, attention_mask=mask, max_new_tokens=20, do_sample=False),
                       want_left)
    torch.manual_seed(123)
    assert torch.equal(hf.generate(ids[:2, :5], max_new_tokens=10, do_sample=True, top_k=50),
                       want_sampled)


def test_generate_uses_fast_prefill_then_original_decode(spy):
    hf = make_hf(attn="sdpa")
    ids = torch.randint(0, PAD, (2, 8), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=5, do_sample=False)
    gptfast.patch(hf, backend="auto")  # the default choice (native C++ on CPU when it builds)
    assert torch.equal(hf.generate(ids, max_new_tokens=5, do_sample=False), want)
    # 2 layers x 1 prefill on the causal op; the 4 decode steps (filled cache) go to the original
    assert spy["causal_attention"] == 2
    assert spy["gelu_mlp"] == 2 * 5


def test_gradients_match():
    hf = make_hf(attn="eager", seed=3)
    ids = torch.randint(0, PAD, (2, 16), generator=torch.Generator().manual_seed(4))
    hf(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    gptfast.patch(hf, backend="reference")
    hf(ids, labels=ids).loss.backward()
    for n, p in hf.named_parameters():
        assert_close(p.grad, want[n], atol=1e-5, what=f"grad {n}")


def test_gpt2model_base_class():
    hf = make_hf(cls=GPT2Model, attn="eager", seed=5)
    ids = torch.randint(0, PAD, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        gptfast.patch(hf)
        got = hf(ids).last_hidden_state
    assert_close(got, want)


def test_unpatch_restores_original_forwards(spy):
    hf = make_hf(attn="eager", seed=7)
    ids = torch.randint(0, PAD, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = hf(ids).logits
    gptfast.patch(hf)
    assert hf_patch.is_patched(hf)
    assert "forward" in hf.transformer.h[0].attn.__dict__
    gptfast.patch(hf, backend="reference")  # patching twice: only the backend changes
    assert hf.transformer.h[0].mlp._gptfast_patch["backend"] == "reference"
    gptfast.unpatch(hf)
    assert not hf_patch.is_patched(hf)
    for m in hf.modules():
        assert "forward" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    n = dict(spy)
    with torch.no_grad():
        after = hf(ids).logits
    assert spy == n, "gptfast ops ran after unpatch"
    assert torch.equal(after, before)  # bit-identical: the original code path again


def test_unpatch_keeps_a_previous_instance_override():
    hf = make_hf(attn="eager", seed=9)
    ln = hf.transformer.ln_f
    marker = []

    def custom(self, x):
        marker.append(1)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    ln.forward = custom.__get__(ln)
    gptfast.patch(hf)
    gptfast.unpatch(hf)
    with torch.no_grad():
        hf(torch.zeros(1, 3, dtype=torch.long))
    assert marker == [1]


def test_patch_uses_live_weights_no_copies():
    hf = make_hf(attn="eager", seed=10)
    ptrs = {n: p.data_ptr() for n, p in hf.named_parameters()}
    gptfast.patch(hf)
    assert {n: p.data_ptr() for n, p in hf.named_parameters()} == ptrs
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in make_hf().parameters())
    ids = torch.randint(0, PAD, (1, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():  # change weights after patching: the patched forward must see them
        hf.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
        hf.transformer.h[0].ln_1.bias.add_(0.3)
        hf.transformer.h[0].attn.c_attn.weight.mul_(-1.0)
        got = hf(ids).logits
        gptfast.unpatch(hf)
        want = hf(ids).logits
    assert_close(got, want)


def test_output_attentions_still_returned():
    hf = make_hf(attn="eager", seed=12)
    ids = torch.randint(0, PAD, (1, 7), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want = hf(ids, output_attentions=True).attentions
        gptfast.patch(hf)
        got = hf(ids, output_attentions=True).attentions
    assert len(got) == 2 and all(a is not None for a in got)
    for g, w in zip(got, want):
        assert_close(g, w, what="attention weights")


def test_unsupported_activation_keeps_original_mlp(spy):
    # (the exact GELU "gelu" is patched exactly: tests/test_activation.py)
    hf = make_hf(attn="eager", seed=14, activation_function="quick_gelu")  # x sigmoid(1.702 x)
    ids = torch.randint(0, PAD, (1, 6), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        want = hf(ids).logits
    with pytest.warns(UserWarning, match="activation_function='quick_gelu'"):
        gptfast.patch(hf)
    with torch.no_grad():
        got = hf(ids).logits
    assert spy["gelu_mlp"] == 0 and spy["causal_attention"] == 2
    assert_close(got, want)


def test_rejects_non_gpt2_models_and_bad_backend():
    with pytest.raises(TypeError, match="found no GPT2Block"):
        gptfast.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        gptfast.patch(make_hf(), backend="cuda-magic")


def test_version_guard_major(monkeypatch):
    import sys

    # sys.modules' entry: transformers swaps its lazy top-level module object after import
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.3")
    with pytest.raises(RuntimeError, match=r"supports transformers 5\.x.*got 4\.46\.3"):
        gptfast.patch(make_hf())


@pytest.mark.parametrize("cache_arg", ["past_key_values", "cache"])
def test_cache_argument_mapped_by_name(monkeypatch, cache_arg):
    """transformers 5.24 renamed GPT2Attention.forward's `past_key_values` to `cache`: whichever name
    the installed class uses, the patched attention takes the cache under that name (by keyword and
    positionally) and hands it back under that name when it falls back to the original."""
    seen = {}

    def original(self, hidden_states, *args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return hidden_states, None

    params = ["self", "hidden_states", cache_arg, "attention_mask", "encoder_hidden_states",
              "encoder_attention_mask", "output_attentions", "kwargs"]
    assert hf_patch._cache_arg_name(tuple(params)) == cache_arg
    model = make_hf()
    gptfast.patch(model)
    attn = model.transformer.h[0].attn
    # What the class would have been for this version: the fallback must call it with `cache_arg`.
    monkeypatch.setitem(attn.__dict__["_gptfast_patch"], "saved_forward", MethodType(original, attn))
    x = torch.randn(1, 3, model.config.n_embd)
    marker = object()  # not a DynamicCache: forces the fallback path
    patched = hf_patch._ATTENTION_FORWARDS[cache_arg]
    patched(attn, x, **{cache_arg: marker})
    assert seen["kwargs"][cache_arg] is marker and seen["args"] == ()
    patched(attn, x, marker)  # positionally (third parameter)
    assert seen["kwargs"][cache_arg] is marker
    other = "cache" if cache_arg == "past_key_values" else "past_key_values"
    assert other not in seen["kwargs"]


def test_version_guard_signature(monkeypatch):
    def forward(self, hidden_states, layer_past=None, attention_mask=None, head_mask=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(modeling_gpt2.GPT2Attention, "forward", forward)
    with pytest.raises(RuntimeError, match="GPT2Attention.forward takes"):
        gptfast.patch(make_hf())


def test_tested_signature_is_current():
    # The guard's expectation is what this transformers really has (else every patch would raise).
    import transformers

    params = tuple(inspect.signature(modeling_gpt2.GPT2Attention.forward).parameters)
    assert hf_patch._cache_arg_name(params) is not None, params
    # The installed release is one the patch claims (setup.py's test extra bounds it to these).
    assert ".".join(transformers.__version__.split(".")[:2]) in hf_patch.SUPPORTED_TRANSFORMERS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptfast.patch(make_hf())
