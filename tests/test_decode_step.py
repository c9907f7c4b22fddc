"""gptfast::decode_step (one GPT-2 decoding step as one native CPU op): bit-for-bit the engine's
Python step with the native kernels (which the engine tests check against the no-cache
reference), with fp32 and bf16 matrices, odd head dims, no biases, rows at different positions;
opcheck; every bad input rejected with a message naming it, before any cache is written."""

from __future__ import annotations

import pytest
import torch

from gptfast import GPT, GPTConfig, engine
from gptfast.ops import native


@pytest.fixture(autouse=True, scope="module")
def _native():
    if native.availability("cpu") is not None:
        pytest.fail(f"native backend unavailable: {native.availability('cpu')}")
    assert native.decode_step_available()


def _setup(n_layer=2, n_head=3, n_embd=24, vocab=37, block=16, bias=True, B=3, weight_dtype=None, seed=0,
           activation="gelu_tanh"):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=0.0, bias=bias, activation=activation)
    model = GPT(cfg, backend="native").eval()
    if bias:  # non-zero biases and LayerNorm affine parameters, so a dropped one shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.5 if "ln" in name else 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    D = n_embd // n_head
    fns = engine.resolve_ops("native", "cpu", torch.float32, D, n_embd)
    fns.skinny, fns.skinny_max_m = engine._skinny_for(fns, "cpu", torch.float32)
    assert fns.skinny is not None
    w = engine.decode_weights(model, torch.float32, engine._NO_COPY_LAYOUT, weight_dtype)
    args = engine.fused_step_args(w, fns, "cpu")
    assert args is not None
    g = torch.Generator().manual_seed(seed + 1)
    # caches as a prefill would leave them (random history), positions differ per row
    kc = [torch.randn(B, n_head, block, D, generator=g) for _ in range(n_layer)]
    vc = [torch.randn(B, n_head, block, D, generator=g) for _ in range(n_layer)]
    tokens = torch.randint(0, vocab, (B,), generator=g)
    pos = torch.tensor([block - 1, 0, 5, 9, 2][:B])
    return model, w, fns, args, kc, vc, tokens, pos


@pytest.mark.parametrize("cfg", [
    dict(),                                                    # D = 8
    dict(n_head=2, n_embd=10, bias=False),                     # D = 5 (no 8-wide path), no biases at all
    dict(n_layer=1, n_head=4, n_embd=64, vocab=300, B=1),      # D = 16, one row
    dict(weight_dtype=torch.bfloat16),                         # bf16 matrices, fp32 math
    dict(n_head=1, n_embd=40, B=5, weight_dtype=torch.bfloat16),
    dict(activation="gelu"),                                   # exact (erf) GELU: exact_gelu=True
    dict(n_head=1, n_embd=40, B=5, weight_dtype=torch.bfloat16, activation="gelu"),
])
def test_equals_the_python_step(cfg):
    model, w, fns, args, kc, vc, tokens, pos = _setup(**cfg)
    kc2, vc2 = [t.clone() for t in kc], [t.clone() for t in vc]
    with torch.inference_mode():
        want = engine.decode_one_token(w, fns, kc, vc, tokens, pos)
        got = engine.decode_one_token_fused(args, kc2, vc2, tokens, pos)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().max()
    for a, b in zip(kc + vc, kc2 + vc2):  # K/V written at each row's position, nothing else touched
        assert torch.equal(a, b)


def test_cache_rows_written_at_their_positions():
    model, w, fns, args, kc, vc, tokens, pos = _setup()
    before = [t.clone() for t in kc]
    with torch.inference_mode():
        engine.decode_one_token_fused(args, kc, vc, tokens, pos)
    for old, new in zip(before, kc):
        changed = (old != new).any(-1)  # (B, H, T)
        for b, p in enumerate(pos.tolist()):
            assert changed[b, :, p].all() and changed[b].sum() == changed.shape[1], (b, p)


def test_opcheck():
    model, w, fns, args, kc, vc, tokens, pos = _setup(B=2)
    wte, wpe, flat, lnf_w, lnf_b, w_head, eps, exact_gelu = args
    torch.library.opcheck(torch.ops.gptfast.decode_step.default,
                          (tokens, pos, wte, wpe, flat, lnf_w, lnf_b, w_head, kc, vc, eps))
    torch.library.opcheck(torch.ops.gptfast.decode_step.default,
                          (tokens, pos, wte, wpe, flat, lnf_w, lnf_b, w_head, kc, vc, eps, True))


def _call(args, kc, vc, tokens, pos, over):
    wte, wpe, flat, lnf_w, lnf_b, w_head, eps, _exact = args
    a = dict(tokens=tokens, pos=pos, wte=wte, wpe=wpe, layers=list(flat), lnf_w=lnf_w, lnf_b=lnf_b,
             w_head=w_head, k_cache=kc, v_cache=vc, eps=eps)
    a.update(over)
    return torch.ops.gptfast.decode_step(a["tokens"], a["pos"], a["wte"], a["wpe"], a["layers"], a["lnf_w"],
                                         a["lnf_b"], a["w_head"], a["k_cache"], a["v_cache"], a["eps"])


def test_bad_inputs_name_the_argument_and_leave_caches_untouched():
    model, w, fns, args, kc, vc, tokens, pos = _setup()
    flat = args[2]
    snapshot = [t.clone() for t in kc + vc]

    def bad_layer(i, t):
        out = list(flat)
        out[i] = t
        return out

    cases = [
        (dict(tokens=tokens.int()), r"decode_step: tokens must be a 1-D int64 CPU tensor"),
        (dict(tokens=tokens[:0], pos=pos[:0]), r"decode_step: tokens must hold at least one row"),
        (dict(pos=pos[:2]), r"decode_step: pos must be a 1-D int64 CPU tensor of shape \(3\)"),
        (dict(tokens=torch.tensor([0, 37, 1])), r"decode_step: tokens\[1\] must be in \[0, 37\), got 37"),
        (dict(pos=torch.tensor([0, 16, 1])), r"decode_step: pos\[1\] must be in \[0, 16\)"),
        (dict(pos=torch.tensor([-1, 0, 1])), r"decode_step: pos\[0\] must be in \[0, 16\)"),
        (dict(layers=list(flat[:-1])), r"decode_step: layers must hold 12 entries per layer \(24 for 2 cache layers\), got 23"),
        (dict(layers=bad_layer(2, None)), r"decode_step: layers\[2\] \(layer 0 w_qkv\) must be a tensor, got None"),
        (dict(layers=bad_layer(14, flat[14][:-1])), r"decode_step: layer 1 w_qkv must have shape \(72, 24\)"),
        (dict(layers=bad_layer(8, flat[8].double())), r"decode_step: layer 0 w_fc must be float32 or bfloat16, got Double"),
        (dict(layers=bad_layer(8, flat[8].bfloat16())), r"decode_step: layer 0 w_fc and w_proj must have the same dtype"),
        (dict(layers=bad_layer(22, flat[22].t())), r"decode_step: layer 1 w_proj must have shape \(24, 96\)"),
        (dict(layers=bad_layer(13, flat[13][:5])), r"decode_step: layer 1 ln1_b must have shape \(24\)"),
        (dict(layers=bad_layer(3, flat[3].double())), r"decode_step: layer 0 b_qkv must be float32"),
        (dict(k_cache=kc[:1]), r"decode_step: k_cache and v_cache must hold one tensor per layer each, got 1 and 2"),
        (dict(k_cache=[kc[0], kc[1].transpose(2, 3)]), r"decode_step: k_cache\[1\] must be a contiguous 4-D float32"),
        (dict(v_cache=[vc[0].double(), vc[1]]), r"decode_step: v_cache\[0\] must be a contiguous 4-D float32"),
        (dict(k_cache=[kc[0][:, :, :8].contiguous(), kc[1]]), r"decode_step: v_cache\[0\] must have shape \(3, 3, 8, 8\)"),
        (dict(w_head=args[5][:, :5]), r"decode_step: w_head must be a float32 or bfloat16 CPU tensor of shape \(V, 24\)"),
        (dict(lnf_w=torch.ones(5)), r"decode_step: lnf_w must have shape \(24\)"),
        (dict(wpe=args[1].double()), r"decode_step: wpe must be a float32 CPU tensor"),
        (dict(eps=0.0), r"decode_step: eps must be a positive finite number, got 0"),
    ]
    for over, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            _call(args, kc, vc, tokens, pos, over)
        for a, b in zip(kc + vc, snapshot):
            assert torch.equal(a, b), f"cache written before the error: {msg}"
