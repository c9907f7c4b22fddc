"""gptfast::decode_step (one GPT-2 decoding step as one native CPU op, `gptfast.fused_decode`):
bit-for-bit the model's own forward decode step with the native kernels (which the generation tests
check against the no-cache reference), with fp32 and bf16 matrices (`gptfast.quantize`), odd head
dims, no biases, rows at different positions; opcheck; every bad input rejected with a message
naming it, before any cache is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig, fused_decode
from gptfast.generation import decode_one_token
from gptfast.ops import native


@pytest.fixture(autouse=True, scope="module")
def _native():
    if native.availability("cpu") is not None:
        pytest.fail(f"native backend unavailable: {native.availability('cpu')}")
    assert native.decode_step_available()


def _setup(n_layer=2, n_head=3, n_embd=24, vocab=37, block=16, bias=True, B=3, bf16=False, seed=0,
           activation="gelu_tanh", fmt=None, head=True, act_int8=False, tie=True):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=0.0, bias=bias, activation=activation, tie_weights=tie)
    model = GPT(cfg, backend="native").eval()
    if bias:  # non-zero biases and LayerNorm affine parameters, so a dropped one shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.5 if "ln" in name else 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    if bf16:
        gptfast.quantize(model, "bf16")
    if fmt is not None:
        gptfast.quantize(model, fmt, head=head, act_int8=act_int8)
    model.setup_caches(B, block)
    w = fused_decode.step_weights(model, B)
    assert w is not None
    g = torch.Generator().manual_seed(seed + 1)
    # caches as a prompt pass would leave them (random history), positions differ per row
    for c in model.kv_caches:
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
    tokens = torch.randint(0, vocab, (B,), generator=g)
    pos = torch.tensor([block - 1, 0, 5, 9, 2] * 4)[:B]
    return model, w, tokens, pos


def _caches(model):
    return [c.k for c in model.kv_caches], [c.v for c in model.kv_caches]


@pytest.mark.parametrize("cfg", [
    dict(),                                                    # D = 8
    dict(n_head=2, n_embd=10, bias=False),                     # D = 5 (no 8-wide path), no biases at all
    dict(n_layer=1, n_head=4, n_embd=64, vocab=300, B=1),      # D = 16, one row
    dict(bf16=True),                                           # bf16 matrices, fp32 math
    dict(n_head=1, n_embd=40, B=5, bf16=True),
    dict(activation="gelu"),                                   # exact (erf) GELU: exact_gelu=True
    dict(n_head=1, n_embd=40, B=5, bf16=True, activation="gelu"),
])
def test_equals_the_models_forward(cfg):
    model, w, tokens, pos = _setup(**cfg)
    kc, vc = (_caches(model)[0], _caches(model)[1])
    kc0, vc0 = [t.clone() for t in kc], [t.clone() for t in vc]
    with torch.inference_mode():
        want = decode_one_token(model, tokens, pos)  # GPT.forward(idx (B, 1), input_pos (B, 1))
        kc1, vc1 = [t.clone() for t in kc], [t.clone() for t in vc]
        for t, t0 in zip(kc + vc, kc0 + vc0):
            t.copy_(t0)
        got = fused_decode.decode(model, w, tokens, pos)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().max()
    for a, b in zip(kc1 + vc1, kc + vc):  # K/V written at each row's position, nothing else touched
        assert torch.equal(a, b)
    assert all(torch.equal(c.lens, pos + 1) for c in model.kv_caches)


# Quantized models (issue #20, gptfast.quantize's QuantLinear / QuantEmbedding): the block linears
# through quantized_linear, c_fc -> GELU -> c_proj; the LM head and the tied embedding quantized
# (head=True: the embedding's rows dequantized from the head's buffers) or kept fp32; act_int8.
_Q = dict(n_head=4, n_embd=64, vocab=70)
QUANT_CASES = [
    dict(fmt="int8", **_Q),
    dict(fmt="int8-g32", head=False, **_Q),
    dict(fmt="int8-g32", B=1, activation="gelu", **_Q),
    dict(fmt="int4-g32", **_Q),
    dict(fmt="int4-g32-zp", bias=False, B=5, **_Q),
    dict(fmt="int4-g128-zp", n_head=2, n_embd=128, vocab=41),
    dict(fmt="int4-g64", tie=False, **_Q),                     # an untied head and its own QuantEmbedding
    dict(fmt="int8", act_int8=True, **_Q),                      # int8 activations, head too
    dict(fmt="int8-g32", act_int8=True, head=False, B=16, **_Q),
    dict(fmt="int4-g32", act_int8=True, **_Q),                  # int4 ignores act_int8 (weight-only)
]


@pytest.mark.parametrize("cfg", QUANT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in _Q))
def test_quantized_model_equals_the_models_forward(cfg):
    test_equals_the_models_forward(cfg)


def test_quantized_generation_runs_the_fused_step():
    model, w, tokens, pos = _setup(fmt="int8-g32", **_Q)
    assert w.bits == 8 and w.group_size == 32 and w.head_bits == 8 and w.wte_bits == 8
    model.clear_caches()
    stats = {}
    got = gptfast.generate(model, [[1, 2, 3], [4]], 5, temperature=0.0, stats=stats)
    assert stats["decode_step"] == "native fused"
    want = gptfast.generate(model, [[1, 2, 3], [4]], 5, temperature=0.0, backend="reference")
    assert got == want


def test_cache_rows_written_at_their_positions():
    model, w, tokens, pos = _setup()
    kc, _ = _caches(model)
    before = [t.clone() for t in kc]
    with torch.inference_mode():
        fused_decode.decode(model, w, tokens, pos)
    for old, new in zip(before, kc):
        changed = (old != new).any(-1)  # (B, H, T)
        for b, p in enumerate(pos.tolist()):
            assert changed[b, :, p].all() and changed[b].sum() == changed.shape[1], (b, p)


def test_applies_only_where_it_computes_the_same():
    """The fused step is used only when every op of the step resolves to native on CPU fp32 and
    every linear is a format the kernel reads; otherwise generation runs the model's forward."""
    model, w, tokens, pos = _setup()
    assert fused_decode.step_weights(model, native.SKINNY_MAX_M + 1) is None  # too many rows
    assert fused_decode.step_weights(model, 1, backend="torch") is None
    model.transformer.h[0].ln_2.eps = 1e-6  # two LayerNorm eps: the kernel takes one
    assert fused_decode.step_weights(model, 1) is None


def _args(w, kc, vc, tokens, pos):
    d = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    d.update(tokens=tokens, pos=pos, k_cache=kc, v_cache=vc)
    for k in ("group_size", "head_group_size", "wte_group_size"):
        d[k] = d[k] or 0  # None: per channel
    return d


_ORDER = ("tokens", "pos", "wte", "wpe", "ln1_w", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_w", "ln2_b",
          "w_fc", "b_fc", "w_proj", "b_proj", "lnf_w", "lnf_b", "w_head", "k_cache", "v_cache",
          "s_qkv", "z_qkv", "s_o", "z_o", "s_fc", "z_fc", "s_proj", "z_proj", "s_head", "z_head", "s_wte", "z_wte",
          "eps", "exact_gelu", "bits", "group_size", "head_bits", "head_group_size", "wte_bits", "wte_group_size",
          "act_int8")


def _call(a):
    return torch.ops.gptfast.decode_step(*[a[k] for k in _ORDER])


def test_opcheck():
    model, w, tokens, pos = _setup(B=2)
    kc, vc = _caches(model)
    for exact in (False, True):
        a = _args(w, kc, vc, tokens, pos)
        a["exact_gelu"] = exact
        torch.library.opcheck(torch.ops.gptfast.decode_step.default, tuple(a[k] for k in _ORDER))


def test_bad_inputs_name_the_argument_and_leave_caches_untouched():
    model, w, tokens, pos = _setup()
    kc, vc = _caches(model)
    snapshot = [t.clone() for t in kc + vc]

    def layer(kind, i, t):  # w's list `kind` with layer i replaced by t
        out = list(getattr(w, kind))
        out[i] = t
        return {kind: out}

    cases = [
        (dict(tokens=tokens.int()), r"decode_step: tokens must be a 1-D int64 CPU tensor"),
        (dict(tokens=tokens[:0], pos=pos[:0]), r"decode_step: tokens must hold at least one row"),
        (dict(pos=pos[:2]), r"decode_step: pos must be a 1-D int64 CPU tensor of shape \(3\)"),
        (dict(tokens=torch.tensor([0, 37, 1])), r"decode_step: tokens\[1\] must be in \[0, 37\), got 37"),
        (dict(pos=torch.tensor([0, 16, 1])), r"decode_step: pos\[1\] must be in \[0, 16\)"),
        (dict(pos=torch.tensor([-1, 0, 1])), r"decode_step: pos\[0\] must be in \[0, 16\)"),
        (dict(w_proj=w.w_proj[:-1]), r"decode_step: w_proj must hold one entry per layer \(2"),
        (dict(b_qkv=w.b_qkv + [None]), r"decode_step: b_qkv must hold one entry per layer \(2"),
        (layer("w_qkv", 1, w.w_qkv[1][:-1]), r"decode_step: layer 1 w_qkv must have shape \(72, 24\)"),
        (layer("w_fc", 0, w.w_fc[0].double()), r"decode_step: layer 0 w_fc must be float32 or bfloat16, got Double"),
        (layer("w_fc", 0, w.w_fc[0].bfloat16()), r"decode_step: layer 0 w_fc and w_proj must have the same dtype"),
        (layer("w_proj", 1, w.w_proj[1].t()), r"decode_step: layer 1 w_proj must have shape \(24, 96\)"),
        (layer("ln1_b", 1, w.ln1_b[1][:5]), r"decode_step: layer 1 ln1_b must have shape \(24\)"),
        (layer("b_qkv", 0, w.b_qkv[0].double()), r"decode_step: layer 0 b_qkv must be float32"),
        (dict(k_cache=kc[:1]), r"decode_step: k_cache and v_cache must hold one tensor per layer each, got 1 and 2"),
        (dict(k_cache=[kc[0], kc[1].transpose(2, 3)]), r"decode_step: k_cache\[1\] must be a contiguous 4-D float32"),
        (dict(v_cache=[vc[0].double(), vc[1]]), r"decode_step: v_cache\[0\] must be a contiguous 4-D float32"),
        (dict(k_cache=[kc[0][:, :, :8].contiguous(), kc[1]]), r"decode_step: v_cache\[0\] must have shape \(3, 3, 8, 8\)"),
        (dict(w_head=w.w_head[:, :5]), r"decode_step: w_head must be a float32 or bfloat16 CPU tensor of shape \(V, 24\)"),
        (dict(lnf_w=torch.ones(5)), r"decode_step: lnf_w must have shape \(24\)"),
        (dict(wpe=w.wpe.double()), r"decode_step: wpe must be a float32 CPU tensor"),
        (dict(eps=0.0), r"decode_step: eps must be a positive finite number, got 0"),
    ]
    for over, msg in cases:
        a = _args(w, kc, vc, tokens, pos)
        a.update(over)
        with pytest.raises(RuntimeError, match=msg):
            _call(a)
        for x, y in zip(kc + vc, snapshot):
            assert torch.equal(x, y), f"cache written before the error: {msg}"
