"""skinny_linear (native CPU, x @ w.T + b for few rows): vs an fp64 reference over row counts that
hit every tile remainder, odd K / N, GPT-2 shapes, with and without bias, strided inputs, autograd,
opcheck, clear errors; and gelu_mlp's small-M forward (which uses the same kernel) at GPT-2 shape."""

from __future__ import annotations

import pytest
import torch

from gptfast.ops import native, reference
from tests.helpers import assert_close

MS = [1, 2, 3, 4, 5, 8, 13, 16, 17, 33]
SHAPES = [(67, 131), (768, 2304), (5, 3), (1, 9)]  # (K, N)

# The kernel runs AVX-512 tiles where CPUID has avx512f/bw/vl (tile shape by M: 8x1, 8x2, 6x4, 3x8
# weight rows x x rows) and the 8-lane kernel of AVX2-only machines elsewhere; GPTFAST_SKINNY_ISA=
# generic forces the latter, so both are tested on an AVX-512 machine (on an AVX2 machine both
# parametrisations run the 8-lane kernel). M in MS hits every tile shape and row remainder, N every
# weight-row remainder (131 = 16 * 8 + 3 = 21 * 6 + 5 = 43 * 3 + 2), K the masked / scalar K tails.
ISAS = ["auto", "generic"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("GPTFAST_SKINNY_ISA", raising=False)
    else:
        monkeypatch.setenv("GPTFAST_SKINNY_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True, scope="module")
def _native():
    if native.availability("cpu") is not None:
        pytest.fail(f"native backend unavailable: {native.availability('cpu')}")
    assert native.skinny_linear_available("cpu")


def _inputs(M, K, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    return x, w, b


def _ref(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _tol32(x, w, K):
    # fp32 sums of K products of size |x||w| in another order than the fp64 reference: error
    # ~ sqrt(K) ulp of the partial sums; 1e-5 relative to the sum of |products| is ~20x margin.
    scale = (x.double().abs() @ w.double().abs().t()).max().item() + 1.0
    return 1e-5 * scale


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_fp64_reference(M, K, N, bias, isa):
    x, w, b = _inputs(M, K, N, seed=M * 1000 + K + N)
    b = b if bias else None
    y = native.skinny_linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (M, N) and y.is_contiguous()
    assert_close(y, _ref(x, w, b), atol=_tol32(x, w, K), rtol=1e-5, what=f"{isa} M={M} K={K} N={N} bias={bias}")


# bf16 weights with fp32 x (weight-only bf16): exactly x @ w.float().T, i.e. the same tolerance as the
# fp32 kernel against an fp64 reference of the *widened* weight. K values hit the 32-wide prefetch
# loop, the 8-wide loop and the scalar tail (K % 8 != 0); N hits every 4-row tile remainder.
@pytest.mark.parametrize("K,N", [(67, 131), (768, 2304), (5, 3), (1, 9), (40, 6), (3072, 37)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_weights_match_fp64_reference_of_the_widened_weight(M, K, N, bias, isa):
    x, w, b = _inputs(M, K, N, seed=M * 7 + K + N)
    b = b if bias else None
    wb = w.bfloat16()
    y = native.skinny_linear(x, wb, b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    wf = wb.float()
    assert_close(y, _ref(x, wf, b), atol=_tol32(x, wf, K), rtol=1e-5,
                 what=f"{isa} bf16 w M={M} K={K} N={N} bias={bias}")
    # and strided bf16 weights (row slice: used in place; transposed storage: copied)
    ws = torch.randn(2 * N, K).bfloat16()[::2]
    assert_close(native.skinny_linear(x, ws, None), _ref(x, ws.float(), None), atol=_tol32(x, ws.float(), K),
                 rtol=1e-5, what="bf16 row slice")


def _cpu_has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {x}" in flags for x in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


# GPTFAST_BF16_DOT=1 (opt-in; bf16 weights; CPUs with avx512_bf16): x rounded to bf16 and
# vdpbf16ps. Exact (to fp32 summation) for the bf16-rounded x; against the true x its error is that
# of rounding x (unit roundoff 2^-8 per element, so <= 2^-8 sum |x w|). Without avx512_bf16 the
# variable must change nothing.
@pytest.mark.parametrize("K,N", [(67, 131), (768, 2304), (5, 3), (1, 9), (40, 6), (3072, 37)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 17])
def test_bf16_dot_opt_in(M, K, N, monkeypatch):
    x, w, b = _inputs(M, K, N, seed=M * 11 + K + N)
    wb = w.bfloat16()
    monkeypatch.delenv("GPTFAST_BF16_DOT", raising=False)
    y_default = native.skinny_linear(x, wb, b)
    monkeypatch.setenv("GPTFAST_BF16_DOT", "1")
    y = native.skinny_linear(x, wb, b)
    if not _cpu_has_avx512_bf16():
        assert torch.equal(y, y_default), "GPTFAST_BF16_DOT changed the result on a CPU without avx512_bf16"
        return
    xr = x.bfloat16().float()
    assert_close(y, _ref(xr, wb.float(), b), atol=_tol32(xr, wb.float(), K), rtol=1e-5,
                 what=f"bf16 dot M={M} K={K} N={N} vs the bf16-rounded x")
    scale = (x.double().abs() @ wb.double().abs().t()).max().item()
    err = (y.double() - _ref(x, wb.float(), b)).abs().max().item()
    assert err <= 2**-8 * scale + _tol32(x, wb.float(), K), f"bf16 dot error {err} vs the fp32 x"
    if K >= 40:  # the opt-in is engaged: x's rounding shows (the default path is ~1e-7 of scale)
        assert (y - y_default).abs().max().item() > 1e-5 * scale


def test_bf16_dot_opt_in_nan_and_fp32_weights(monkeypatch):
    monkeypatch.setenv("GPTFAST_BF16_DOT", "1")
    x, w, b = _inputs(3, 67, 20)
    x[1, 5] = float("nan")
    y = native.skinny_linear(x, w.bfloat16(), b)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    # fp32 weights ignore the variable
    monkeypatch.delenv("GPTFAST_BF16_DOT")
    y32 = native.skinny_linear(x, w, b)
    monkeypatch.setenv("GPTFAST_BF16_DOT", "1")
    assert torch.allclose(native.skinny_linear(x, w, b), y32, rtol=0, atol=0, equal_nan=True)


# The option serves the prompt pass too (many rows): ops linear and gelu_mlp's inference forward.
# Without it (or without avx512_bf16) many rows keep the exact widened-weight GEMM.
@pytest.mark.parametrize("M", [17, 40, 130])
@pytest.mark.parametrize("dot", [False, True])
def test_bf16_dot_many_rows_linear(M, dot, monkeypatch):
    K, N = 200, 77
    x, w, b = _inputs(M, K, N, seed=M)
    wb = w.bfloat16()
    monkeypatch.setenv("GPTFAST_BF16_DOT", "1" if dot else "0")
    y = native.linear(x, wb, b)
    engaged = dot and _cpu_has_avx512_bf16()
    xr = x.bfloat16().float() if engaged else x  # the option's arithmetic: x rounded to bf16
    assert_close(y, _ref(xr, wb.float(), b), atol=_tol32(xr, wb.float(), K), rtol=1e-5,
                 what=f"linear M={M} dot={dot} (engaged={engaged})")
    if engaged:  # x's rounding shows against the exact arithmetic
        scale = (x.double().abs() @ wb.double().abs().t()).max().item()
        assert (y.double() - _ref(x, wb.float(), b)).abs().max().item() > 1e-5 * scale


@pytest.mark.parametrize("M", [17, 64])
@pytest.mark.parametrize("dot", [False, True])
def test_bf16_dot_many_rows_gelu_mlp(M, dot, monkeypatch):
    g = torch.Generator().manual_seed(M)
    C, Fh = 96, 384
    x = torch.randn(M, C, generator=g)
    w_fc, b_fc = (torch.randn(Fh, C, generator=g) / C**0.5).bfloat16(), torch.randn(Fh, generator=g)
    w_proj, b_proj = (torch.randn(C, Fh, generator=g) / Fh**0.5).bfloat16(), torch.randn(C, generator=g)
    monkeypatch.setenv("GPTFAST_BF16_DOT", "1" if dot else "0")
    with torch.no_grad():
        y = native.gelu_mlp(x, w_fc, b_fc, w_proj, b_proj)
    engaged = dot and _cpu_has_avx512_bf16()
    wf, wp = w_fc.double(), w_proj.double()

    def ref(r16):  # fp64, activations rounded to bf16 before each product if r16 (the option)
        h = reference.gelu_tanh(r16(x) @ wf.t() + b_fc.double())
        return r16(h) @ wp.t() + b_proj.double(), h

    y_exact, h = ref(lambda t: t.double())
    y_dot, _ = ref(lambda t: t.float().bfloat16().double())
    scale = (h.abs() @ wp.abs().t()).max().item() + 1.0
    err_exact = (y.double() - y_exact).abs().max().item()
    err_dot = (y.double() - y_dot).abs().max().item()
    if not engaged:
        assert err_exact <= 1e-5 * scale, f"gelu_mlp M={M} dot={dot}: error {err_exact} vs the exact arithmetic"
        return
    # The option's arithmetic explains the result: against it only fp32 sums and a rare bf16
    # rounding of h taken the other way (our fp32 pre-activation vs the fp64 one), far below the
    # effect of rounding the activations, which the exact reference sees in full.
    assert err_dot <= 2**-8 * scale, f"gelu_mlp M={M}: error {err_dot} vs the bf16-dot arithmetic"
    assert err_dot <= 0.25 * err_exact, (f"gelu_mlp M={M}: not the bf16-dot arithmetic (error {err_dot} vs it, "
                                         f"{err_exact} vs the exact one)")


def test_bf16_weights_autograd_and_opcheck():
    x, w, b = _inputs(3, 9, 10)
    wb = w.bfloat16().requires_grad_()
    xg = x.clone().requires_grad_()
    y = native.skinny_linear(xg, wb, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(xg.grad, dy @ wb.detach().float(), atol=1e-5, rtol=1e-5, what="dx")
    assert wb.grad.dtype == torch.bfloat16
    # dw against an fp64 reference, rounded to bf16 by the op: within one bf16 ulp (2^-8 relative)
    assert_close(wb.grad.float(), dy.double().t() @ x.double(), atol=1e-6, rtol=2**-8, what="dw")
    torch.library.opcheck(torch.ops.gptfast.skinny_linear.default, (x, w.bfloat16(), b))


@pytest.mark.parametrize("M", [1, 4, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_fp64(M, bias):
    x, w, b = _inputs(M, 67, 131, torch.float64, seed=M)
    b = b if bias else None
    y = native.skinny_linear(x, w, b)
    assert y.dtype == torch.float64
    assert_close(y, _ref(x, w, b), atol=1e-12, rtol=1e-12, what=f"fp64 M={M}")


@pytest.mark.parametrize("M", [1, 8])
def test_gpt2_head_and_mlp_shapes(M, isa):
    for K, N in [(768, 50257), (3072, 768), (768, 3072)]:
        x, w, b = _inputs(M, K, N, seed=K + N)
        assert_close(native.skinny_linear(x, w, b), _ref(x, w, b), atol=_tol32(x, w, K), rtol=1e-5,
                     what=f"{isa} M={M} {K}->{N}")
        wb = w.bfloat16()
        assert_close(native.skinny_linear(x, wb, b), _ref(x, wb.float(), b), atol=_tol32(x, wb.float(), K),
                     rtol=1e-5, what=f"{isa} bf16 M={M} {K}->{N}")


def test_noncontiguous_inputs():
    x, w, b = _inputs(6, 67, 131)
    xt = x.t().contiguous().t()  # (6, 67) with strides (1, 6)
    assert not xt.is_contiguous()
    assert_close(native.skinny_linear(xt, w, b), _ref(x, w, b), atol=_tol32(x, w, 67), rtol=1e-5, what="x.T view")
    xs = torch.randn(6, 100)[:, 10:77]  # row stride 100, inner stride 1: used in place
    assert_close(native.skinny_linear(xs, w, b), _ref(xs, w, b), atol=_tol32(xs, w, 67), rtol=1e-5, what="x slice")
    wt = w.t().contiguous().t()  # (131, 67) with inner stride 131: copied
    assert_close(native.skinny_linear(x, wt, b), _ref(x, w, b), atol=_tol32(x, w, 67), rtol=1e-5, what="w.T view")
    ws = torch.randn(200, 67)[::2]  # every other row: row stride 134
    assert_close(native.skinny_linear(x, ws, None), _ref(x, ws, None), atol=_tol32(x, ws, 67), rtol=1e-5,
                 what="w row slice")
    bs = torch.randn(262)[::2]
    assert_close(native.skinny_linear(x, w, bs), _ref(x, w, bs), atol=_tol32(x, w, 67), rtol=1e-5, what="b slice")


def test_empty_shapes():
    w = torch.randn(5, 4)
    assert native.skinny_linear(torch.randn(0, 4), w, None).shape == (0, 5)
    assert native.skinny_linear(torch.randn(3, 4), torch.randn(0, 4), None).shape == (3, 0)
    b = torch.randn(5)
    assert torch.equal(native.skinny_linear(torch.randn(3, 0), torch.randn(5, 0), b), b.expand(3, 5))


def test_autograd_and_gradcheck():
    x, w, b = (t.requires_grad_() for t in _inputs(3, 5, 7, torch.float64))
    assert torch.autograd.gradcheck(native.skinny_linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: native.skinny_linear(x, w, None), (x, w))


def test_opcheck():
    native.load_extension()
    x, w, b = _inputs(5, 67, 131)
    torch.library.opcheck(torch.ops.gptfast.skinny_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.gptfast.skinny_linear.default, (x, w, None))
    xg, wg, bg = (t.requires_grad_() for t in _inputs(3, 9, 10))
    torch.library.opcheck(torch.ops.gptfast.skinny_linear.default, (xg, wg, bg))


def test_errors():
    native.load_extension()
    f = torch.ops.gptfast.skinny_linear
    x, w, b = _inputs(4, 8, 16)
    with pytest.raises(RuntimeError, match=r"skinny_linear: x must be float32 or float64, got Half"):
        f(x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match=r"skinny_linear: weight must have x's dtype Float \(or bfloat16 with "
                                           r"float32 x: bf16 weights, fp32 math\), got Double"):
        f(x, w.double(), b)
    with pytest.raises(RuntimeError, match=r"skinny_linear: weight must have x's dtype Double .*got BFloat16"):
        f(x.double(), w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="skinny_linear: bias must have x's dtype Float, got Double"):
        f(x, w, b.double())
    with pytest.raises(RuntimeError, match=r"skinny_linear: weight must have shape \(N, 8\) to match x"):
        f(x, w[:, :7], b)
    with pytest.raises(RuntimeError, match=r"skinny_linear: bias must have shape \(16\), got \[15\]"):
        f(x, w, b[:15])
    with pytest.raises(RuntimeError, match=r"skinny_linear: x must be 2-D \(M, K\), got shape \[8\]"):
        f(x[0], w, b)
    with pytest.raises(RuntimeError, match=r"skinny_linear: weight must be 2-D \(N, K\)"):
        f(x, w[0], b)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="skinny_linear: weight must be a CPU tensor"):
        f.default.redispatch(cpu, x, w.to("meta"), b)


@pytest.mark.parametrize("M", [1, 8, 16, 17])
def test_gelu_mlp_small_m_path_matches_reference(M):
    """gelu_mlp's forward takes the skinny path for M <= 16 (fp32, unit-stride weights) and addmm
    above: both must give the reference's y and the pre-activation it returns for backward."""
    g = torch.Generator().manual_seed(M)
    C, Fh = 768, 3072
    x = torch.randn(M, C, generator=g)
    w_fc, b_fc = torch.randn(Fh, C, generator=g) / C**0.5, torch.randn(Fh, generator=g)
    w_proj, b_proj = torch.randn(C, Fh, generator=g) / Fh**0.5, torch.randn(C, generator=g)
    y, pre = torch.ops.gptfast.gelu_mlp_fwd(x, w_fc, b_fc, w_proj, b_proj)
    pre_ref = _ref(x, w_fc, b_fc)
    assert_close(pre, pre_ref, atol=_tol32(x, w_fc, C), rtol=1e-5, what="pre")
    y_ref = reference.gelu_mlp(*(t.double() for t in (x, w_fc, b_fc, w_proj, b_proj)))
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")
    # Transposed-view weights (the addmm path whatever M) agree with the skinny path.
    y2, pre2 = torch.ops.gptfast.gelu_mlp_fwd(x, w_fc.t().contiguous().t(), b_fc, w_proj.t().contiguous().t(), b_proj)
    assert_close(y2, y, atol=1e-4, rtol=1e-4, what="addmm path vs skinny path")
