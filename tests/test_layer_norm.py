"""LayerNorm: every CPU backend vs the reference, forward and backward; native gradcheck, opcheck,
odd shapes, non-contiguous inputs, torch.compile, and clear errors on bad input."""

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
# backend may be off by at most 2x the error of PyTorch in the same dtype (the reference composite,
# and F.layer_norm while it is trustworthy: pytorch_baselines), plus two roundings of the output --
# forward and every gradient alike.


def _inputs(M, N, affine=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, generator=g, dtype=dtype) * 2 + 0.5
    w = torch.randn(N, generator=g, dtype=dtype) if affine else None
    b = torch.randn(N, generator=g, dtype=dtype) if affine else None
    return x, w, b


def _run(backend, x, w, b, dy, eps, dtype=None):
    """(y, dx, dw, db) of `backend` on copies of the inputs (cast to `dtype` if given)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [cast(t).detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = ops.layer_norm(*leaves, eps, backend=backend)
    y.backward(cast(dy))
    return [y] + [t.grad if t is not None else None for t in leaves]


def _check_against_reference(backend, x, w, b, eps=1e-5):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    got = _run(backend, x, w, b, dy, eps)
    truth = _run("reference", x, w, b, dy, eps, dtype=torch.float64)
    composite = _run("reference", x, w, b, dy, eps)
    fused = _run("torch", x, w, b, dy, eps)  # PyTorch's own F.layer_norm: its error counts too
    base = [pytorch_baselines(t, c, f) if t is not None else None for t, c, f in zip(truth, composite, fused)]
    atol = None  # the rule's own floor: two roundings of each output
    if x.shape[-1] == 1:
        # N = 1: x - mean = 0 exactly, so the truth of y - bias, dx and dweight is 0 and the
        # reference's fp32 happens to get exactly 0 too; a backend that forms x - mean another way
        # keeps one rounding of x, amplified by rstd = 1/sqrt(eps) and summed over M rows in
        # dweight. That conditioning bound is the floor here (still far below an O(1) bug).
        atol = torch.finfo(x.dtype).eps * x.abs().max().item() / eps ** 0.5 * dy.abs().max().item() * x.shape[0] ** 0.5
    for name, o, t, p in zip(("forward", "dx", "dweight", "dbias"), got, truth, base):
        if o is not None:
            assert_error_within(o, t, p, atol=atol, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", available_backends("layer_norm", dtype=torch.float32, n=768))
@pytest.mark.parametrize("M", [1, 9, 97])
@pytest.mark.parametrize("N", [1, 7, 80, 768, 1023])
def test_matches_reference(backend, M, N):
    _check_against_reference(backend, *_inputs(M, N, seed=M * 1000 + N))


# Outputs of >= 4 MiB (kStreamMinBytes in csrc/cpu/simd.h) are written with non-temporal stores,
# which need 32-byte aligned addresses: rows of 771 floats start at every alignment, so each row
# peels a different head before its aligned middle and scalar tail (dx in backward likewise).
@pytest.mark.parametrize("M,N,affine", [(1400, 771, True), (1366, 768, True), (1400, 771, False)])
def test_native_large_outputs_streaming_stores(M, N, affine):
    assert M * N * 4 >= 4 << 20, "below kStreamMinBytes: this test would not reach the streaming path"
    _check_against_reference("native", *_inputs(M, N, affine=affine, seed=N))


@pytest.mark.parametrize("backend", available_backends("layer_norm", dtype=torch.float32, n=768))
def test_no_affine_and_3d_and_noncontiguous(backend):
    x, _, _ = _inputs(8, 33)
    _check_against_reference(backend, x, None, None)
    x3 = torch.randn(2, 5, 64)
    _check_against_reference(backend, x3, torch.randn(64), None)
    xt = torch.randn(64, 12).t()  # (12, 64) transposed view: not contiguous
    assert not xt.is_contiguous()
    _check_against_reference(backend, xt, torch.randn(64), torch.randn(64)[::1])
    w_strided = torch.randn(128)[::2]  # a strided weight
    _check_against_reference(backend, torch.randn(3, 64), w_strided, torch.randn(64))


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 300), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_native(M, N, affine, seed):
    _check_against_reference("native", *_inputs(M, N, affine, seed))


@pytest.mark.parametrize("M,N,affine", [(1, 1, True), (3, 7, True), (4, 5, False)])
def test_native_gradcheck_fp64(M, N, affine):
    x, w, b = _inputs(M, N, affine, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: native.layer_norm(x, w, b, 1e-5)) if affine else (lambda x: native.layer_norm(x, None, None))
    assert torch.autograd.gradcheck(fn, args)


def test_opcheck():
    native.load_extension()
    x, w, b = _inputs(5, 24)
    torch.library.opcheck(torch.ops.gptfast.layer_norm_fwd.default, (x, w.requires_grad_(), b, 1e-5))
    torch.library.opcheck(torch.ops.gptfast.layer_norm_fwd.default, (x.requires_grad_(), None, None, 1e-5))
    y, mean, rstd = torch.ops.gptfast.layer_norm_fwd(x.detach(), w.detach(), b, 1e-5)
    torch.library.opcheck(torch.ops.gptfast.layer_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(), mean, rstd))


def test_torch_compile_fullgraph():
    native.load_extension()
    x, w, b = _inputs(6, 48)
    x.requires_grad_()
    fn = torch.compile(lambda x, w, b: native.layer_norm(x, w, b, 1e-5).sin().sum(), fullgraph=True, backend="aot_eager")
    out = fn(x, w, b)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    ref = reference.layer_norm(xr, w, b).sin().sum()
    ref.backward()
    assert_close(out, ref, atol=1e-4, rtol=1e-5, what="compiled forward")
    assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4, what="compiled dx")


def test_dispatch_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, torch.randn(7), None, backend="native")
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.layer_norm(x, torch.randn(8, dtype=torch.float64), None, backend="native")
    with pytest.raises(ValueError, match="eps must be a positive"):
        ops.layer_norm(x, None, None, -1.0, backend="native")
    with pytest.raises(ValueError, match="weight must be on x's device"):
        ops.layer_norm(x, torch.randn(8, device="meta"), None, backend="native")
    with pytest.raises(ops.BackendUnavailableError, match="float32 and float64"):
        ops.layer_norm(x.half(), None, None, backend="native")


def test_cpp_checks():
    native.load_extension()
    f = torch.ops.gptfast.layer_norm_fwd
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: x must be 2-D \(M, N\)"):
        f(torch.randn(2, 3, 4), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: weight must have shape \(4\)"):
        f(torch.randn(2, 4), torch.randn(5), None, 1e-5)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: bias must have x's dtype"):
        f(torch.randn(2, 4), None, torch.randn(4, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: x must be float32 or float64"):
        f(torch.randn(2, 4).half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: eps must be a positive"):
        f(torch.randn(2, 4), None, None, float("nan"))
    # Device mismatch: call the CPU kernel itself (a meta argument would otherwise route to the fake).
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: weight must be on x's device"):
        f.default.redispatch(cpu, torch.randn(2, 4), torch.randn(4, device="meta"), None, 1e-5)
    b = torch.ops.gptfast.layer_norm_bwd
    x = torch.randn(3, 4)
    _, mean, rstd = f(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: dy must have x's shape"):
        b(torch.randn(3, 5), x, None, mean, rstd)
    with pytest.raises(RuntimeError, match=r"layer_norm_bwd: rstd must be a float32 tensor of shape \(3\)"):
        b(torch.randn(3, 4), x, None, mean, rstd[:2])


def test_empty_rows():
    y = native.layer_norm(torch.randn(0, 16), None, None)
    assert y.shape == (0, 16)
