"""GELU-MLP: every CPU backend vs the reference, forward and backward; native gradcheck, opcheck,
shapes that break tiling, non-contiguous inputs, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfast import ops
from gptfast.ops import native, reference
from gptfast.testing import pytorch_baselines
from tests.helpers import assert_close, assert_error_within, available_backends

# The project's one tolerance rule (gptfast/testing.py): the truth is the reference in fp64, and a
# backend may be off by at most 2x PyTorch's own error in the same dtype (the reference composite,
# and the torch backend's F.linear / F.gelu while trustworthy: pytorch_baselines), plus two roundings
# of the output -- forward and every gradient alike.


def _inputs(M, C, F, C_out, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(M, C)
    w_fc, w_proj = r(F, C) / C**0.5, r(C_out, F) / F**0.5
    return x, w_fc, r(F) if bias else None, w_proj, r(C_out) if bias else None


def _run(backend, args, dy=None, dtype=None):
    """[y] (+ the gradients of every tensor argument if dy is given) of `backend` on copies."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [cast(t).detach().clone().requires_grad_(dy is not None) if t is not None else None for t in args]
    y = ops.gelu_mlp(*leaves, backend=backend)
    if dy is None:
        return [y.detach()]
    y.backward(cast(dy))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _assert_rule(got, args, dy=None, what=""):
    names = ("y", "dx", "dw_fc", "db_fc", "dw_proj", "db_proj")
    truth = _run("reference", args, dy, dtype=torch.float64)
    composite = _run("reference", args, dy)
    fused = _run("torch", args, dy)
    for name, o, t, c, f in zip(names, got, truth, composite, fused):
        if o is not None:
            assert_error_within(o, t, pytorch_baselines(t, c, f), what=f"{what} {name}")


def _check(backend, x, w_fc, b_fc, w_proj, b_proj):
    args = (x, w_fc, b_fc, w_proj, b_proj)
    dy = torch.randn(*x.shape[:-1], w_proj.shape[0], generator=torch.Generator().manual_seed(5))
    _assert_rule(_run(backend, args, dy), args, dy, what=backend)


@pytest.mark.parametrize("backend", available_backends("gelu_mlp", dtype=torch.float32))
@pytest.mark.parametrize("M,C,F,C_out", [(1, 8, 32, 8), (9, 7, 13, 5), (97, 24, 72, 24), (33, 40, 130, 17)])
def test_matches_reference(backend, M, C, F, C_out):
    _check(backend, *_inputs(M, C, F, C_out, seed=M + C + F))


@pytest.mark.parametrize("backend", available_backends("gelu_mlp", dtype=torch.float32))
def test_no_bias_3d_noncontiguous(backend):
    _check(backend, *_inputs(10, 16, 40, 16, bias=False))
    x, w_fc, b_fc, w_proj, b_proj = _inputs(12, 16, 40, 16)
    _check(backend, x.view(3, 4, 16), w_fc, b_fc, w_proj, b_proj)
    xt = torch.randn(16, 12).t()  # (12, 16) transposed view
    w_fc_t = torch.randn(16, 40).t() / 4  # (40, 16) transposed view
    _check(backend, xt, w_fc_t, b_fc, w_proj, b_proj)


@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 20), C=st.integers(1, 40), F=st.integers(1, 70), C_out=st.integers(1, 30),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_native(M, C, F, C_out, bias, seed):
    _check("native", *_inputs(M, C, F, C_out, bias, seed))


@pytest.mark.parametrize("bias", [True, False])
def test_native_gradcheck_fp64(bias):
    args = [t.requires_grad_() for t in _inputs(3, 5, 7, 4, bias, dtype=torch.float64) if t is not None]
    fn = native.gelu_mlp if bias else (lambda x, a, b: native.gelu_mlp(x, a, None, b, None))
    assert torch.autograd.gradcheck(fn, args)


def test_gelu_large_arguments():
    # The vectorised tanh saturates cleanly: gelu(x) -> x for x >> 0 and -> 0 for x << 0.
    x = torch.tensor([[-1e4, -50.0, -10.0, 0.0, 10.0, 50.0, 1e4]])
    eye = torch.eye(7)
    y = native.gelu_mlp(x, eye, None, eye, None)
    assert_close(y, reference.gelu_mlp(x, eye, None, eye, None), atol=1e-6, rtol=1e-6, what="saturation")


# Inference (nothing requires grad, or grad mode off): native calls gptfast::gelu_mlp_infer, which
# applies GELU in place on its single (M, F) buffer. M <= 16 takes the skinny-matmul path, larger M
# the addmm path; transposed weights force addmm at any M.
@pytest.mark.parametrize("M,C,F,C_out,bias", [(1, 8, 32, 8, True), (16, 24, 72, 24, False), (17, 24, 72, 24, True),
                                              (97, 40, 130, 17, True), (300, 64, 256, 64, False)])
def test_native_inference_path(M, C, F, C_out, bias, monkeypatch):
    native.load_extension()
    x, w_fc, b_fc, w_proj, b_proj = _inputs(M, C, F, C_out, bias, seed=M)
    calls = []
    real = torch.ops.gptfast.gelu_mlp_infer
    monkeypatch.setattr(torch.ops.gptfast, "gelu_mlp_infer", lambda *a: calls.append(1) or real(*a))
    args = (x, w_fc, b_fc, w_proj, b_proj)
    _assert_rule([ops.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, backend="native")], args, what="no requires_grad")
    with torch.no_grad():
        xg = x.clone().requires_grad_()
        _assert_rule([ops.gelu_mlp(xg, w_fc, b_fc, w_proj, b_proj, backend="native")], args, what="no_grad")
        wt = w_fc.t().contiguous().t()  # same values, transposed storage
        _assert_rule([ops.gelu_mlp(x, wt, b_fc, w_proj, b_proj, backend="native")], args, what="strided w_fc")
    assert len(calls) == 3, "the inference forward was not used"
    y_train = ops.gelu_mlp(x.clone().requires_grad_(), w_fc, b_fc, w_proj, b_proj, backend="native")
    assert len(calls) == 3 and y_train.requires_grad, "a forward needing gradients must save pre (gelu_mlp_fwd)"
    x64 = [t.double() if t is not None else None for t in (x, w_fc, b_fc, w_proj, b_proj)]
    assert_close(real(*x64), reference.gelu_mlp(*x64), atol=1e-12, rtol=1e-12, what="fp64")


# Weight-only bf16 (gptfast.quantize(model, "bf16")): gelu_mlp_infer takes bf16 weights with fp32 x
# and must equal the reference run on the widened weights (the fp32 rule: the arithmetic is fp32). M <= 16 reads bf16 in the skinny kernel; M = 17 / 97 widen the weights for addmm.
@pytest.mark.parametrize("M,C,F,C_out,bias", [(1, 768, 3072, 768, True), (3, 24, 72, 24, False),
                                              (16, 40, 130, 17, True), (17, 24, 72, 24, True),
                                              (97, 40, 130, 17, False)])
def test_infer_bf16_weights_match_reference_on_widened_weights(M, C, F, C_out, bias):
    native.load_extension()
    x, w_fc, b_fc, w_proj, b_proj = _inputs(M, C, F, C_out, bias, seed=M + C)
    wf, wp = w_fc.bfloat16(), w_proj.bfloat16()
    y = torch.ops.gptfast.gelu_mlp_infer(x, wf, b_fc, wp, b_proj)
    assert y.dtype == torch.float32 and y.shape == (M, C_out)
    widened = (x, wf.float(), b_fc, wp.float(), b_proj)  # the same function, fp32 weights
    _assert_rule([y], widened, what=f"bf16 weights M={M}")
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_infer.default, (x, wf, b_fc, wp, b_proj))
    with pytest.raises(RuntimeError, match="gelu_mlp_infer: w_fc and w_proj must have the same dtype"):
        torch.ops.gptfast.gelu_mlp_infer(x, wf, b_fc, w_proj, b_proj)
    with pytest.raises(RuntimeError, match=r"gelu_mlp_infer: w_fc must have x's dtype Double \(or bfloat16"):
        torch.ops.gptfast.gelu_mlp_infer(x.double(), wf, None, wp, None)
    with pytest.raises(RuntimeError, match="gelu_mlp_fwd: w_fc must have x's dtype Float, got BFloat16"):
        torch.ops.gptfast.gelu_mlp_fwd(x, wf, b_fc, wp, b_proj)  # training keeps one dtype


def test_opcheck():
    native.load_extension()
    x, w_fc, b_fc, w_proj, b_proj = _inputs(6, 8, 20, 5)
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_infer.default, (x, w_fc, b_fc, w_proj, b_proj))
    xl = torch.randn(40, 8)  # past the skinny path
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_infer.default, (xl, w_fc, None, w_proj, b_proj))
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_fwd.default,
                          (x.requires_grad_(), w_fc.requires_grad_(), b_fc, w_proj, None))
    y, pre = torch.ops.gptfast.gelu_mlp_fwd(x.detach(), w_fc.detach(), b_fc, w_proj, b_proj)
    torch.library.opcheck(torch.ops.gptfast.gelu_mlp_bwd.default, (torch.randn_like(y), x.detach(), w_fc.detach(), w_proj, pre))


def test_errors():
    x, w_fc, b_fc, w_proj, b_proj = _inputs(4, 8, 16, 8)
    with pytest.raises(ValueError, match=r"w_proj must have shape \(C_out, 16\)"):
        ops.gelu_mlp(x, w_fc, b_fc, w_proj[:, :15], b_proj, backend="native")
    with pytest.raises(ops.BackendUnavailableError, match="float32 and float64"):
        ops.gelu_mlp(*(t.half() for t in (x, w_fc, b_fc, w_proj, b_proj)), backend="native")
    native.load_extension()
    f = torch.ops.gptfast.gelu_mlp_fwd
    with pytest.raises(RuntimeError, match=r"gelu_mlp_fwd: w_fc must have shape \(F, 8\)"):
        f(x, w_fc[:, :7], b_fc, w_proj, b_proj)
    with pytest.raises(RuntimeError, match=r"gelu_mlp_infer: w_fc must have shape \(F, 8\)"):
        torch.ops.gptfast.gelu_mlp_infer(x, w_fc[:, :7], b_fc, w_proj, b_proj)
    with pytest.raises(RuntimeError, match=r"gelu_mlp_infer: b_proj must have shape \(8\)"):
        torch.ops.gptfast.gelu_mlp_infer(x, w_fc, b_fc, w_proj, b_proj[:3])
    with pytest.raises(RuntimeError, match=r"gelu_mlp_fwd: b_fc must have shape \(16\)"):
        f(x, w_fc, b_fc[:3], w_proj, b_proj)
    with pytest.raises(RuntimeError, match=r"gelu_mlp_fwd: x must be 2-D"):
        f(x.view(2, 2, 8), w_fc, b_fc, w_proj, b_proj)
    with pytest.raises(RuntimeError, match="gelu_mlp_fwd: w_proj must have x's dtype"):
        f(x, w_fc, b_fc, w_proj.double(), b_proj)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="gelu_mlp_fwd: w_fc must be a CPU tensor"):
        f.default.redispatch(cpu, x, w_fc.to("meta"), b_fc, w_proj, b_proj)
    with pytest.raises(RuntimeError, match=r"gelu_mlp_bwd: pre must have shape \(4, 16\)"):
        torch.ops.gptfast.gelu_mlp_bwd(torch.randn(4, 8), x, w_fc, w_proj, torch.randn(4, 15))
