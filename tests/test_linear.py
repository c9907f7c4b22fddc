"""ops.linear (x weight^T + bias, nn.Linear layout) on every backend, and weight-only bf16 through
the dispatch layer (ops.linear and ops.gelu_mlp with bf16 weights and fp32 x).

The project's one tolerance rule (gptfast/testing.py): the truth is the computation in fp64 on the
same (for bf16 weights: bf16-rounded) values; a backend may be off by at most 2x PyTorch's own
error in the dtype (the reference composite in fp32) plus two roundings of the output. Weight-only
bf16 is fp32 math on the widened weight, so it gets the fp32 rule against that truth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import native
from tests.helpers import assert_error_within, available_backends

BACKENDS = available_backends("linear", include_reference=True, dtype=torch.float32)
MS = [1, 3, 16, 17, 40]  # 1..16: native's skinny kernel on CPU; 17, 40: F.linear
SHAPES = [(37, 129), (129, 37)]  # (K, N), odd


def test_every_cpu_backend_runs_linear():
    # reference and torch always; native where it built (test_dispatch fails if it did not);
    # triton under the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
    assert {"reference", "torch", "native"} <= set(BACKENDS), BACKENDS


def _inputs(shape, K, N, bias, weight_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, K, generator=g)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(weight_dtype)
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def _truth_and_baseline(x, w, b):
    truth = F.linear(x.double(), w.double(), None if b is None else b.double())  # the bf16 values, exactly
    baseline = x @ w.float().t() + (0 if b is None else b)  # plain PyTorch fp32 (the reference composite)
    return truth, baseline


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16w"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
def test_matches_fp64_reference(backend, M, K, N, bias, weight_dtype):
    x, w, b = _inputs((M,), K, N, bias, weight_dtype, seed=M * 1000 + K + N)
    y = ops.linear(x, w, b, backend=backend)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    truth, baseline = _truth_and_baseline(x, w, b)
    assert_error_within(y, truth, baseline, what=f"{backend} M={M} K={K} N={N} bias={bias} w={weight_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16w"])
@pytest.mark.parametrize("lead", [(2, 3), (4, 5), (1, 1, 7)])  # M = 6, 20, 7: both native paths
def test_leading_dims(backend, lead, weight_dtype):
    x, w, b = _inputs(lead, 37, 129, True, weight_dtype, seed=len(lead) + sum(lead))
    y = ops.linear(x, w, b, backend=backend)
    assert y.shape == (*lead, 129) and y.dtype == torch.float32
    truth, baseline = _truth_and_baseline(x, w, b)
    assert_error_within(y, truth, baseline, what=f"{backend} x {(*lead, 37)} w={weight_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M", [3, 17])
def test_gradients_match_fp64_reference(backend, M, bias):
    x, w, b = _inputs((M,), 37, 129, bias, torch.float32, seed=M + 7)
    dy = torch.randn(M, 129, generator=torch.Generator().manual_seed(M))

    def grads(dtype, backend):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, w, b) if t is not None]
        y = ops.linear(*leaves, backend=backend)
        y.backward(dy.to(dtype))
        return [t.grad for t in leaves]

    got = grads(torch.float32, backend)
    truth = grads(torch.float64, "reference")
    baseline = grads(torch.float32, "reference")
    for name, o, t, c in zip(("dx", "dweight", "dbias"), got, truth, baseline):
        assert o.dtype == torch.float32
        assert_error_within(o, t, c, what=f"{backend} M={M} {name}")


def test_native_routes_few_rows_to_the_skinny_kernel():
    """M <= SKINNY_MAX_M on CPU runs skinny_linear (bit-for-bit its result); more rows F.linear."""
    assert native.skinny_linear_available("cpu")
    for M in (1, native.SKINNY_MAX_M, native.SKINNY_MAX_M + 1):
        for wd in (torch.float32, torch.bfloat16):
            x, w, b = _inputs((M,), 37, 129, True, wd, seed=M)
            y = ops.linear(x, w, b, backend="native")
            if M <= native.SKINNY_MAX_M:
                assert torch.equal(y, native.skinny_linear(x, w, b)), (M, wd)
            else:
                assert torch.equal(y, F.linear(x, w.float(), b)), (M, wd)


def test_resolved_returns_the_backend_function():
    x, w, b = _inputs((3,), 37, 129, True, torch.float32, seed=1)
    fn = ops.resolved("linear", "cpu", backend="native", dtype=torch.float32)
    assert fn is native.linear
    assert torch.equal(fn(x, w, b), ops.linear(x, w, b, backend="native"))
    with pytest.raises(ValueError, match="resolved: unknown op 'nope'"):
        ops.resolved("nope")


@pytest.mark.parametrize("args,err,msg", [
    (lambda x, w, b: (x.long(), w, b), TypeError, r"linear: x must be a floating-point tensor, got dtype torch.int64"),
    (lambda x, w, b: (x, w.double(), b), TypeError, r"linear: weight must have x's dtype torch.float32 \(or bfloat16"),
    (lambda x, w, b: (x.double(), w.bfloat16(), b.double()), TypeError, r"linear: weight must have x's dtype torch.float64"),
    (lambda x, w, b: (x, w.t(), b), ValueError, r"linear: weight must have shape \(N, 37\) \(nn.Linear layout\), got \(37, 129\)"),
    (lambda x, w, b: (x, w[0], b), ValueError, r"linear: weight must have shape \(N, 37\)"),
    (lambda x, w, b: (x, w, b[:5]), ValueError, r"linear: bias must have shape \(129,\), got \(5,\)"),
    (lambda x, w, b: (x, w, b.double()), TypeError, r"linear: bias must have x's dtype torch.float32, got torch.float64"),
    (lambda x, w, b: (x, w.to("meta"), b), ValueError, r"linear: weight must be on x's device cpu, got meta"),
    (lambda x, w, b: (x, w, b.to("meta")), ValueError, r"linear: bias must be on x's device cpu, got meta"),
    (lambda x, w, b: (x[0, 0], w, b), ValueError, r"linear: x must be \(\.\.\., K\), got a 0-D tensor"),
    (lambda x, w, b: (x, "w", b), TypeError, r"linear: weight must be a torch.Tensor, got str"),
])
def test_bad_inputs_name_the_argument(args, err, msg):
    x, w, b = _inputs((3,), 37, 129, True, torch.float32, seed=0)
    with pytest.raises(err, match=msg):
        ops.linear(*args(x, w, b))


# ----------------------------------------------------------------------------- gelu_mlp, bf16 weights


GELU_BACKENDS = available_backends("gelu_mlp", include_reference=True, dtype=torch.float32)


@pytest.mark.parametrize("backend", GELU_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
@pytest.mark.parametrize("M", [1, 5, 17])
def test_gelu_mlp_weight_only_bf16(backend, M, activation):
    """w_fc / w_proj bf16 with fp32 x (biases fp32): fp32 math on the bf16-rounded weights."""
    g = torch.Generator().manual_seed(M)
    C, Fh = 24, 72
    x = torch.randn(2, M, C, generator=g)
    w_fc = (torch.randn(Fh, C, generator=g) / C**0.5).bfloat16()
    w_proj = (torch.randn(C, Fh, generator=g) / Fh**0.5).bfloat16()
    b_fc, b_proj = torch.randn(Fh, generator=g), torch.randn(C, generator=g)
    with torch.no_grad():
        y = ops.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, activation=activation, backend=backend)
        truth = ops.gelu_mlp(x.double(), w_fc.double(), b_fc.double(), w_proj.double(), b_proj.double(),
                             activation=activation, backend="reference")
        baseline = ops.gelu_mlp(x, w_fc.float(), b_fc, w_proj.float(), b_proj, activation=activation,
                                backend="reference")
    assert y.dtype == torch.float32 and y.shape == (2, M, C)
    assert_error_within(y, truth, baseline, what=f"{backend} M={M} {activation}")


@pytest.mark.parametrize("backend", GELU_BACKENDS)
def test_gelu_mlp_weight_only_bf16_gradient_of_x(backend):
    """Training through bf16 weights (the native training kernel gets widened copies)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 24, generator=g)
    w_fc = (torch.randn(72, 24, generator=g) / 24**0.5).bfloat16()
    w_proj = (torch.randn(24, 72, generator=g) / 72**0.5).bfloat16()
    dy = torch.randn(6, 24, generator=g)

    def dx(xx, wf, wp, backend):
        xx = xx.detach().requires_grad_()
        ops.gelu_mlp(xx, wf, None, wp, None, backend=backend).backward(dy.to(xx.dtype))
        return xx.grad

    got = dx(x, w_fc, w_proj, backend)
    assert_error_within(got, dx(x.double(), w_fc.double(), w_proj.double(), "reference"),
                        dx(x, w_fc.float(), w_proj.float(), "reference"), what=f"{backend} dx")


def test_gelu_mlp_bf16_weights_need_fp32_x():
    x = torch.randn(2, 8, dtype=torch.float64)
    w_fc, w_proj = torch.randn(16, 8).bfloat16(), torch.randn(8, 16).bfloat16()
    with pytest.raises(TypeError, match=r"gelu_mlp: w_fc must have x's dtype torch.float64 \(or bfloat16 with float32 x"):
        ops.gelu_mlp(x, w_fc, None, w_proj, None)
    with pytest.raises(TypeError, match=r"gelu_mlp: b_fc must have x's dtype torch.float32, got torch.bfloat16"):
        ops.gelu_mlp(x.float(), w_fc, w_fc[:, 0], w_proj, None)
