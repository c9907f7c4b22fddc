"""gptfast::quantized_linear, the native CPU kernels (csrc/cpu/quant_linear.cpp; issue #20).

Weight-only (the default): every format against an fp64 reference of the dequantized weight, with
the project's accuracy rule (gptfast.testing.assert_error_within: at most 2x PyTorch's own fp32
error, the `reference` backend, plus two output roundings), over row counts that hit every decode
tile (M <= 16) and the prefill path (M > 16, tiled dequantization + sgemm), odd N (every weight-row
remainder), with and without bias, on both ISA paths (AVX-512 tiles where CPUID has them, and the
8-lane kernel, forced by GPTFAST_SKINNY_ISA=generic, that AVX2-only CPUs run).
act_int8 (int8 activations, llama.cpp's q8_0 x q8_0): against a PyTorch emulation of the same
rounding, bit-identical on both ISA paths, within the activation-rounding bound of the weight-only
result, ties rounded to even. Bad inputs named; opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch

from gptfast import ops
from gptfast.ops import native, reference
from gptfast.ops.quant import dequantize_weight, quantize_weight
from gptfast.testing import assert_error_within

# (name, bits, group_size, zero_point): every format of the contract (gptfast/ops/quant.py).
FORMATS = [
    ("int8", 8, None, False),
    ("int8-g32", 8, 32, False),
    ("int8-g64", 8, 64, False),
    ("int4-g32", 4, 32, False),
    ("int4-g64", 4, 64, False),
    ("int4-g128", 4, 128, False),
    ("int4-g32-zp", 4, 32, True),
    ("int4-g64-zp", 4, 64, True),
    ("int4-g128-zp", 4, 128, True),
]
FMT_IDS = [f[0] for f in FORMATS]
MS = [1, 2, 3, 7, 16, 17, 40]  # decode tiles 8x1, 8x2, 6x4, 3x8 (+ remainders); 17, 40: prefill
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
    assert native.unsupported("quantized_linear", "cpu", dtype=torch.float32, bits=8, act_int8=False) is None


def _weights(N, K, bits, group_size, zp, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    qw, s, z = quantize_weight(w, bits, group_size, zp)
    return qw, s, z, b


def _x(M, K, seed=1):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed))


def _check(y, x, qw, s, z, b, bits, gs, what):
    w64 = dequantize_weight(qw, s, z, bits, gs, torch.float64)
    truth = x.double() @ w64.t() + (0 if b is None else b.double())
    baseline = reference.quantized_linear(x, qw, s, z, b, bits=bits, group_size=gs)  # PyTorch fp32
    assert y.dtype == torch.float32 and y.shape == truth.shape and y.is_contiguous()
    assert_error_within(y, truth, baseline, what=what)


def _call(x, qw, s, z, b, bits, gs, act_int8=False):
    return torch.ops.gptfast.quantized_linear(x, qw, s, z, b, bits, 0 if gs is None else gs, act_int8)


# ----------------------------------------------------------------------------- weight-only


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_matches_fp64_reference(fmt, M, bias, isa):
    name, bits, gs, zp = fmt
    K, N = 256, 67  # N = 8 * 8 + 3 = 11 * 6 + 1 = 22 * 3 + 1 = 16 * 4 + 3: every tile remainder
    qw, s, z, b = _weights(N, K, bits, gs, zp, seed=M)
    b = b if bias else None
    x = _x(M, K, seed=M + 100)
    _check(_call(x, qw, s, z, b, bits, gs), x, qw, s, z, b, bits, gs, f"{name} {isa} M={M} bias={bias}")


@pytest.mark.parametrize("M", [17, 40])
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[1], FORMATS[3], FORMATS[6]], ids=lambda f: f[0])
def test_prefill_spans_several_tiles(fmt, M):
    """M > 16 dequantizes ~1 MB tiles (1024 rows at K = 128): N = 2061 is three tiles, the last partial."""
    name, bits, gs, zp = fmt
    K, N = 128, 2061
    qw, s, z, b = _weights(N, K, bits, gs, zp, seed=3)
    x = _x(M, K)
    _check(_call(x, qw, s, z, b, bits, gs), x, qw, s, z, b, bits, gs, f"{name} M={M} N={N}")


@pytest.mark.parametrize("K", [1, 5, 67, 200])
@pytest.mark.parametrize("M", [1, 2, 5, 17])
def test_int8_per_channel_any_k(K, M, isa):
    """Per-channel int8 takes any K: the AVX-512 masked tail, the 8-lane kernel's scalar tail."""
    qw, s, z, b = _weights(13, K, 8, None, False, seed=K)
    x = _x(M, K, seed=K + M)
    _check(_call(x, qw, s, z, b, 8, None), x, qw, s, z, b, 8, None, f"int8 {isa} M={M} K={K}")


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[1], FORMATS[3], FORMATS[6]], ids=lambda f: f[0])
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("KN", [(768, 2304), (3072, 768)])
def test_gpt2_shapes(fmt, M, KN):
    name, bits, gs, zp = fmt
    K, N = KN
    qw, s, z, b = _weights(N, K, bits, gs, zp, seed=7)
    x = _x(M, K)
    _check(_call(x, qw, s, z, b, bits, gs), x, qw, s, z, b, bits, gs, f"{name} M={M} {K}->{N}")


def test_strided_x_and_dispatch_wrapper():
    qw, s, z, b = _weights(33, 64, 4, 32, True)
    big = _x(3, 100)
    x = big[:, 10:74]  # row stride 100, inner stride 1: read in place
    _check(_call(x, qw, s, z, b, 4, 32), x, qw, s, z, b, 4, 32, "strided x")
    x3 = _x(6, 64).view(2, 3, 64)
    y = ops.quantized_linear(x3, qw, s, z, b, bits=4, group_size=32, backend="native")
    assert y.shape == (2, 3, 33)
    assert torch.equal(y.view(6, 33), _call(x3.reshape(6, 64), qw, s, z, b, 4, 32))


def test_nan_in_x_propagates_to_its_row_only(isa):
    qw, s, z, b = _weights(9, 64, 8, 32, False)
    x = _x(2, 64)
    x[1, 5] = float("nan")
    for act in (False, True):
        y = _call(x, qw, s, z, b, 8, 32, act)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all(), (act, y)


# ----------------------------------------------------------------------------- act_int8


def _emulate_act_int8(x, qw, s, b, gs):
    """The kernel's arithmetic in PyTorch: x quantized per row and 32-block (fp32 ops: amax, d =
    amax / 127, q = round_half_even(x * (127 / amax)) clamped to +-127), exact integer block sums,
    scaled by d_x (x d_w, an fp32 product, for groups) and summed in fp64 (the kernel: fp32)."""
    M, K = x.shape
    N, nb = qw.shape[0], K // 32
    xb = x.view(M, nb, 32)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)
    isum = torch.einsum("mbk,nbk->mnb", q.double(), qw.double().view(N, nb, 32))  # exact integers
    if gs is None:
        sc = d[:, None, :].expand(M, N, nb)
    else:
        dw = s.float().repeat_interleave(gs // 32, dim=1)  # (N, nb): each block's group scale
        sc = d[:, None, :] * dw[None]  # fp32 products, as the kernel
    terms = isum * sc.double()
    y = terms.sum(-1)
    if gs is None:
        y = y * s.double()
    if b is not None:
        y = y + b.double()
    # fp32 accumulation of the kernel: 16 lanes of nb / 2 fma steps, then a 4-level tree
    bound = 4 * 2**-24 * (nb / 2 + 5) * terms.abs().sum(-1) * (s.double().abs() if gs is None else 1.0)
    return y, bound + 2 * 2**-24 * y.abs()


# K = 96: three blocks, the last 64-byte chunk half full (not a multiple of 64: no int8-g64 there).
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16, 17])
@pytest.mark.parametrize("fmt,K", [(FORMATS[0], 96), (FORMATS[0], 256), (FORMATS[1], 96), (FORMATS[1], 256),
                                   (FORMATS[2], 256)], ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_act_int8_matches_emulation(fmt, K, M, isa):
    name, bits, gs, zp = fmt
    qw, s, z, b = _weights(19, K, bits, gs, zp, seed=M)
    x = _x(M, K, seed=M + 5)
    y = _call(x, qw, s, z, b, bits, gs, True)
    want, tol = _emulate_act_int8(x, qw, s, b, gs)
    err = (y.double() - want).abs()
    assert (err <= tol).all(), f"{name} {isa} M={M} K={K}: max error {err.max().item():.3g}, tol {tol.min().item():.3g}"


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[1]], ids=lambda f: f[0])
@pytest.mark.parametrize("M", [1, 2, 4, 7, 16, 40])
def test_act_int8_identical_on_both_isa_paths(fmt, M, monkeypatch):
    """The emulation reproduces the VNNI kernel's lanes, fma order and reduction: the same bits."""
    name, bits, gs, zp = fmt
    qw, s, z, b = _weights(37, 224, bits, gs, zp, seed=M)  # 7 blocks: a half chunk at the end
    x = _x(M, 224, seed=M)
    monkeypatch.delenv("GPTFAST_SKINNY_ISA", raising=False)
    auto = _call(x, qw, s, z, b, bits, gs, True)
    monkeypatch.setenv("GPTFAST_SKINNY_ISA", "generic")
    generic = _call(x, qw, s, z, b, bits, gs, True)
    assert torch.equal(auto, generic), (auto - generic).abs().max()


def test_act_int8_rounds_ties_to_even(isa):
    """x block [127, 2.5, -3.5, 0.5, 0...]: amax 127, so x * 127 / amax = x and the ties round to
    even: q = [127, 2, -4, 0]; weights pick elements 1..3: 2 - 4 + 0 = -2 (half away from zero: 0)."""
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    qw = torch.zeros(1, 32, dtype=torch.int8)
    qw[0, 1:4] = 1
    s = torch.ones(1)
    y = _call(x, qw, s, None, None, 8, None, True)
    assert y.item() == -2.0
    assert _call(x, qw, s, None, None, 8, None, False).item() == -0.5  # weight-only: 2.5 - 3.5 + 0.5


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[1]], ids=lambda f: f[0])
def test_act_int8_error_within_the_activation_rounding_bound(fmt):
    """|y_act - y_weight_only| <= sum_k |x_k - d_b q_k| |w_k| <= sum_k (d_b / 2) |w_k| (plus fp32
    rounding): the activation rounding is the only approximation. GPT-2 shape 768 -> 2304."""
    name, bits, gs, zp = fmt
    K, N = 768, 2304
    qw, s, z, b = _weights(N, K, bits, gs, zp, seed=11)
    x = _x(4, K)
    act = _call(x, qw, s, z, b, bits, gs, True).double()
    wo = _call(x, qw, s, z, b, bits, gs, False).double()
    w64 = dequantize_weight(qw, s, z, bits, gs, torch.float64)
    d = x.view(4, K // 32, 32).abs().amax(-1).double() / 127  # (M, nb)
    bound = (d.repeat_interleave(32, dim=1) / 2) @ w64.abs().t()  # (M, N)
    slack = 1e-5 * (x.double().abs() @ w64.abs().t())
    assert ((act - wo).abs() <= bound + slack).all()


# ----------------------------------------------------------------------------- errors, opcheck


def _good():
    qw, s, z, b = _weights(5, 64, 4, 32, True)
    return dict(x=_x(2, 64), qw=qw, s=s, z=z, b=b, bits=4, gs=32, act=False)


def _bad_cases():
    q8, s8, _, b8 = _weights(5, 64, 8, 32, False)
    qc, sc, _, _ = _weights(5, 40, 8, None, False)
    return [
        (dict(bits=3), "bits must be 8 or 4"),
        (dict(gs=16), "group_size must be 0"),
        (dict(gs=0), "int4 (bits=4) is group-wise only"),
        (dict(x=_x(2, 64).double()), "x must be float32"),
        (dict(x=_x(2, 64).view(1, 2, 64)), "x must be 2-D"),
        (dict(x=_x(2, 48)), "x must have K = 64"),
        (dict(qw=_weights(5, 64, 4, 32, True)[0].view(torch.int8)), "qweight must be Byte"),
        (dict(qw=torch.zeros(64, 10, dtype=torch.uint8).t()), "qweight must be a contiguous"),
        (dict(s=torch.ones(5, 2)), "scale must be float16"),
        (dict(s=torch.ones(5, 3, dtype=torch.float16)), "scale must be float16 of shape (5, 2)"),
        (dict(z=torch.ones(5, 3, dtype=torch.float16)), "zero must be"),
        (dict(b=torch.ones(4)), "bias must be"),
        (dict(b=torch.ones(5, dtype=torch.float64)), "bias must be"),
        (dict(act=True), "act_int8 (int8 activations) is for the int8 formats"),
        (dict(qw=q8, s=s8, z=torch.ones(5, 2, dtype=torch.float16), bits=8), "zero is an int4 option"),
        (dict(qw=q8, s=s8, z=None, bits=8, gs=128), "must be divisible by group_size"),
        (dict(qw=qc, s=sc, z=None, bits=8, gs=0, x=_x(2, 40), act=True), "K must be a multiple of 32"),
        (dict(qw=qc, s=sc.half(), z=None, bits=8, gs=0, x=_x(2, 40)), "scale must be float32 of shape (5)"),
    ]


@pytest.mark.parametrize("change,msg", _bad_cases(), ids=lambda c: str(c)[:40])
def test_bad_inputs_named(change, msg):
    a = {**_good(), **change}
    with pytest.raises(RuntimeError, match="quantized_linear: " + ".*" + msg.replace("(", r"\(").replace(")", r"\)")):
        _call(a["x"], a["qw"], a["s"], a["z"], a["b"], a["bits"], a["gs"], a["act"])


def test_unsupported_rules():
    assert "float32" in native.unsupported("quantized_linear", "cpu", dtype=torch.float64, bits=8)
    # int4 formats ignore act_int8 in the wrapper (weight-only, as every other backend): supported
    assert native.unsupported("quantized_linear", "cpu", dtype=torch.float32, bits=4, act_int8=True) is None
    assert native.unsupported("quantized_linear", "cpu", dtype=torch.float32, bits=8, act_int8=True) is None


@pytest.mark.parametrize("fmt,act", [(FORMATS[0], False), (FORMATS[0], True), (FORMATS[1], True),
                                     (FORMATS[6], False)], ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_opcheck(fmt, act):
    name, bits, gs, zp = fmt
    qw, s, z, b = _weights(11, 64, bits, gs, zp)
    for M in (3, 20):
        torch.library.opcheck(torch.ops.gptfast.quantized_linear.default,
                              (_x(M, 64), qw, s, z, b, bits, 0 if gs is None else gs, act))
