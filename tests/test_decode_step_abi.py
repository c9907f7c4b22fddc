"""gptfast::decode_step's by-name ABI (`native.DecodeStepWeights` + `native.decode_step`): bit-for-bit
the same step written with the public ops (layer_norm, linear, decode_attention, gelu_mlp on the
native backend) on a tiny random GPT-2 built here with torch (no gptfast.model), fp32 and bf16
matrices, B = 1 and 3, biases and none; bad inputs name the list they are in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptfast import ops
from gptfast.ops import native

N_LAYER, N_HEAD, C, V, BLOCK, FF = 2, 3, 24, 37, 16, 96
D = C // N_HEAD
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _native():
    if native.availability("cpu") is not None:
        pytest.fail(f"native backend unavailable: {native.availability('cpu')}")
    assert native.decode_step_available()


def _weights(matrix_dtype=torch.float32, bias=True, exact_gelu=False, seed=0) -> native.DecodeStepWeights:
    g = torch.Generator().manual_seed(seed)

    def mat(n, k):
        return (torch.randn(n, k, generator=g) / k**0.5).to(matrix_dtype)

    def vec(n, mean=0.0):  # non-zero LayerNorm affine and biases, so a dropped or swapped one shows
        return torch.randn(n, generator=g) * 0.3 + mean if bias else None

    L = range(N_LAYER)
    return native.DecodeStepWeights(
        wte=mat(V, C), wpe=torch.randn(BLOCK, C, generator=g) * 0.1,
        ln1_w=[vec(C, 1.0) for _ in L], ln1_b=[vec(C) for _ in L],
        w_qkv=[mat(3 * C, C) for _ in L], b_qkv=[vec(3 * C) for _ in L],
        w_o=[mat(C, C) for _ in L], b_o=[vec(C) for _ in L],
        ln2_w=[vec(C, 1.0) for _ in L], ln2_b=[vec(C) for _ in L],
        w_fc=[mat(FF, C) for _ in L], b_fc=[vec(FF) for _ in L],
        w_proj=[mat(C, FF) for _ in L], b_proj=[vec(C) for _ in L],
        lnf_w=vec(C, 1.0), lnf_b=vec(C), w_head=mat(V, C), eps=EPS, exact_gelu=exact_gelu,
    )


def _state(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    kc = [torch.randn(B, N_HEAD, BLOCK, D, generator=g) for _ in range(N_LAYER)]  # history as a prefill left it
    vc = [torch.randn(B, N_HEAD, BLOCK, D, generator=g) for _ in range(N_LAYER)]
    tokens = torch.randint(0, V, (B,), generator=g)
    pos = torch.tensor([BLOCK - 1, 0, 6][:B])  # every row at its own position
    return kc, vc, tokens, pos


def _python_step(w: native.DecodeStepWeights, kc, vc, tokens, pos):
    """The same step with the public ops (what the model's decode forward does on `native`)."""
    nat = dict(backend="native")
    B = tokens.shape[0]
    x = w.wte[tokens].float() + w.wpe[pos]
    for l in range(N_LAYER):
        h = ops.layer_norm(x, w.ln1_w[l], w.ln1_b[l], w.eps, **nat)
        qkv = ops.linear(h, w.w_qkv[l], w.b_qkv[l], **nat)  # (B, 3C)
        q, k, v = qkv.view(B, 3, N_HEAD, D).unbind(1)
        rows = torch.arange(B)
        kc[l][rows, :, pos] = k
        vc[l][rows, :, pos] = v
        y = ops.decode_attention(q.unsqueeze(2), kc[l], vc[l], pos + 1, **nat)  # (B, H, 1, D)
        x = x + ops.linear(y.reshape(B, C), w.w_o[l], w.b_o[l], **nat)
        h = ops.layer_norm(x, w.ln2_w[l], w.ln2_b[l], w.eps, **nat)
        x = x + ops.gelu_mlp(h, w.w_fc[l], w.b_fc[l], w.w_proj[l], w.b_proj[l],
                             activation="gelu" if w.exact_gelu else "gelu_tanh", **nat)
    x = ops.layer_norm(x, w.lnf_w, w.lnf_b, w.eps, **nat)
    return ops.linear(x, w.w_head, None, **nat)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("matrix_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias,exact_gelu", [(True, False), (False, False), (True, True)],
                         ids=["bias", "nobias", "erf-gelu"])
def test_equals_the_step_written_with_the_public_ops(B, matrix_dtype, bias, exact_gelu):
    w = _weights(matrix_dtype, bias, exact_gelu, seed=B)
    kc, vc, tokens, pos = _state(B)
    kc2, vc2 = [t.clone() for t in kc], [t.clone() for t in vc]
    with torch.inference_mode():
        want = _python_step(w, kc, vc, tokens, pos)
        got = native.decode_step(tokens, pos, w, kc2, vc2)
    assert got.dtype == torch.float32 and got.shape == (B, V)
    assert torch.equal(got, want), (got - want).abs().max()
    for a, b in zip(kc + vc, kc2 + vc2):  # K/V written at each row's position, nothing else touched
        assert torch.equal(a, b)


def test_opcheck():
    w = _weights()
    kc, vc, tokens, pos = _state(2)
    args = (tokens, pos, w.wte, w.wpe, w.ln1_w, w.ln1_b, w.w_qkv, w.b_qkv, w.w_o, w.b_o, w.ln2_w, w.ln2_b,
            w.w_fc, w.b_fc, w.w_proj, w.b_proj, w.lnf_w, w.lnf_b, w.w_head, kc, vc,
            [], [], [], [], [], [], [], [], None, None, None, None, w.eps)  # no quantized matrices
    torch.library.opcheck(torch.ops.gptfast.decode_step.default, args)
    torch.library.opcheck(torch.ops.gptfast.decode_step.default, args + (True,))


@pytest.mark.parametrize("name", native.DecodeStepWeights.LISTS)
def test_a_list_of_the_wrong_length_is_named(name):
    w = _weights()
    kc, vc, tokens, pos = _state(3)
    short = getattr(w, name)[:-1]
    with pytest.raises(ValueError, match=rf"DecodeStepWeights: {name} must hold one entry per layer like the other lists \(2\), got 1"):
        dataclasses.replace(w, **{name: short})
    # the op checks it too, against k_cache's length (a list changed after construction)
    setattr(w, name, short)
    snapshot = [t.clone() for t in kc + vc]
    with pytest.raises(RuntimeError, match=rf"decode_step: {name} must hold one entry per layer \(2, the length of k_cache\), got 1"):
        native.decode_step(tokens, pos, w, kc, vc)
    assert all(torch.equal(a, b) for a, b in zip(kc + vc, snapshot))


@pytest.mark.parametrize("name", native.DecodeStepWeights.MATRICES)
def test_a_none_matrix_is_named(name):
    w = _weights()
    with pytest.raises(ValueError, match=rf"DecodeStepWeights: {name}\[1\] \(layer 1 {name}\) must be a tensor, got NoneType"):
        dataclasses.replace(w, **{name: [getattr(w, name)[0], None]})
    # set after construction: the op's schema (Tensor[]) refuses it, naming the argument
    getattr(w, name)[1] = None
    kc, vc, tokens, pos = _state(3)
    with pytest.raises(RuntimeError, match=rf"Expected a value of type 'List\[Tensor\]' for argument '{name}'"):
        native.decode_step(tokens, pos, w, kc, vc)


def test_bad_tensors_in_a_list_are_named_by_layer_and_list():
    w = _weights()
    kc, vc, tokens, pos = _state(3)
    snapshot = [t.clone() for t in kc + vc]
    cases = [
        (dict(w_qkv=[w.w_qkv[0], w.w_qkv[1][:-1]]), r"decode_step: layer 1 w_qkv must have shape \(72, 24\)"),
        (dict(w_fc=[w.w_fc[0].double(), w.w_fc[1]]), r"decode_step: layer 0 w_fc must be float32 or bfloat16, got Double"),
        (dict(w_fc=[w.w_fc[0].bfloat16(), w.w_fc[1]]), r"decode_step: layer 0 w_fc and w_proj must have the same dtype"),
        (dict(w_proj=[w.w_proj[0], w.w_proj[1].t()]), r"decode_step: layer 1 w_proj must have shape \(24, 96\)"),
        (dict(w_o=[w.w_o[0], w.w_o[1][:, :3]]), r"decode_step: layer 1 w_o must have shape \(24, 24\)"),
        (dict(ln1_b=[w.ln1_b[0], w.ln1_b[1][:5]]), r"decode_step: layer 1 ln1_b must have shape \(24\)"),
        (dict(b_qkv=[w.b_qkv[0].double(), w.b_qkv[1]]), r"decode_step: layer 0 b_qkv must be float32"),
        (dict(b_fc=[w.b_fc[0], w.b_fc[1][:3]]), r"decode_step: layer 1 b_fc must have shape \(96\)"),
        (dict(ln2_w=[torch.ones(5), w.ln2_w[1]]), r"decode_step: layer 0 ln2_w must have shape \(24\)"),
        (dict(lnf_w=torch.ones(5)), r"decode_step: lnf_w must have shape \(24\)"),
        (dict(w_head=w.w_head[:, :5]), r"decode_step: w_head must be a float32 or bfloat16 CPU tensor of shape \(V, 24\)"),
        (dict(eps=0.0), r"decode_step: eps must be a positive finite number, got 0"),
    ]
    for over, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            native.decode_step(tokens, pos, dataclasses.replace(w, **over), kc, vc)
        assert all(torch.equal(a, b) for a, b in zip(kc + vc, snapshot)), f"cache written before the error: {msg}"
