"""gptfast.ops.quant (quantize / dequantize / int4 packing, issue #20's formats) against a slow,
per-element implementation written here from the contract, and ops.quantized_linear (validation;
reference and torch backends, and native where it has the op) under the project's one tolerance
rule: the truth is fp64 math on the dequantized weight, a backend may be off by at most 2x plain
PyTorch's error in the dtype plus two roundings of the output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import quant
from gptfast.testing import pytorch_baselines
from tests.helpers import assert_error_within, available_backends

# (bits, group_size, zero_point): every format of the contract
FORMATS = [(8, None, False), (8, 32, False), (4, 32, False), (4, 64, False), (4, 128, False),
           (4, 32, True), (4, 64, True), (4, 128, True)]
FMT_IDS = ["int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128", "int4-g32-zp", "int4-g64-zp", "int4-g128-zp"]


def _f16(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float64).half())


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float64).float())


def slow_quantize(w: torch.Tensor, bits: int, group_size, zero_point: bool):
    """The contract, one element at a time in Python floats: returns (q or nibble u as nested
    lists, scale list, zero list or None), unpacked."""
    N, K = w.shape
    rows = w.double().tolist()
    q_out, s_out, z_out = [], [], []
    for n in range(N):
        row = rows[n]
        if group_size is None:
            s = _f32(max(abs(v) for v in row) / 127.0)
            q_out.append([0 if s == 0 else max(-127, min(127, round(v / s))) for v in row])
            s_out.append(s)
            continue
        qs, ss, zs = [], [], []
        for g0 in range(0, K, group_size):
            grp = row[g0:g0 + group_size]
            if bits == 8:
                s = _f16(max(abs(v) for v in grp) / 127.0)
                qs += [0 if s == 0 else max(-127, min(127, round(v / s))) for v in grp]
            elif not zero_point:
                m = grp[0]
                for v in grp:  # the first element of largest magnitude, with its sign
                    if abs(v) > abs(m):
                        m = v
                s = _f16(m / -8.0)
                qs += [8 if s == 0 else max(-8, min(7, round(v / s))) + 8 for v in grp]
            else:
                lo, hi = min(grp), max(grp)
                s = _f16((hi - lo) / 15.0)
                z = _f16(lo + 8.0 * s) if s != 0 else _f16(lo)
                qs += [8 if s == 0 else max(-8, min(7, round((v - z) / s))) + 8 for v in grp]
                zs.append(z)
            ss.append(s)
        q_out.append(qs)
        s_out.append(ss)
        z_out.append(zs)
    return q_out, s_out, (z_out if zero_point else None)


def slow_dequantize(q, s, z, bits, group_size):
    """w[n][k] from the unpacked values, per element, in Python floats (float64)."""
    out = []
    for n, row in enumerate(q):
        r = []
        for k, v in enumerate(row):
            if group_size is None:
                r.append(v * s[n])
                continue
            g = k // group_size
            val = v * s[n][g] if bits == 8 else (v - 8) * s[n][g]
            if z is not None:
                val += z[n][g]
            r.append(val)
        out.append(r)
    return torch.tensor(out, dtype=torch.float64)


def slow_pack(u):
    """Byte 16 b + j of a row: k = 32 b + j in the low nibble, k = 32 b + j + 16 in the high one."""
    out = []
    for row in u:
        K = len(row)
        out.append([row[32 * (i // 16) + i % 16] | (row[32 * (i // 16) + i % 16 + 16] << 4) for i in range(K // 2)])
    return torch.tensor(out, dtype=torch.uint8)


def _weight(N, K, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * scale


# ----------------------------------------------------------------------------- quant.py


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("N,K", [(5, 128), (7, 256), (3, 384)])
def test_quantize_matches_per_element_contract(fmt, N, K):
    bits, group_size, zp = fmt
    w = _weight(N, K, seed=N * K + bits)
    w[1, :] *= 20.0  # rows of different magnitude
    qweight, scale, zero = quant.quantize_weight(w, bits, group_size, zp)
    q_slow, s_slow, z_slow = slow_quantize(w, bits, group_size, zp)
    if bits == 8:
        assert qweight.dtype == torch.int8 and qweight.shape == (N, K)
        assert qweight.tolist() == q_slow
    else:
        assert qweight.dtype == torch.uint8 and qweight.shape == (N, K // 2)
        assert torch.equal(qweight, slow_pack(q_slow))
        assert quant.unpack_int4(qweight).tolist() == q_slow
    want_sdtype = torch.float32 if group_size is None else torch.float16
    assert scale.dtype == want_sdtype
    assert scale.double().tolist() == s_slow
    if zp:
        assert zero.dtype == torch.float16 and zero.double().tolist() == z_slow
    else:
        assert zero is None
    # dequantize: the formulas, per element (float64 exact; float32 = one rounding of it)
    truth = slow_dequantize(q_slow, s_slow, z_slow, bits, group_size)
    assert torch.equal(quant.dequantize_weight(qweight, scale, zero, bits, group_size, torch.float64), truth)
    assert torch.equal(quant.dequantize_weight(qweight, scale, zero, bits, group_size), truth.float())


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_round_trip_error_is_within_half_a_step(fmt):
    bits, group_size, zp = fmt
    N, K = 9, 256
    w = _weight(N, K, seed=7)
    qweight, scale, zero = quant.quantize_weight(w, bits, group_size, zp)
    back = quant.dequantize_weight(qweight, scale, zero, bits, group_size, torch.float64)
    g = K if group_size is None else group_size
    step = scale.double().abs().reshape(N, -1).repeat_interleave(g, dim=1)  # (N, K): each element's step
    err = (back - w.double()).abs()
    if bits == 4 and not zp:
        # q4_0 maps the largest-magnitude element to -8; the opposite extreme clamps at +7:
        # an error of at most one step there, half a step (plus fp16 rounding of the scale) elsewhere
        bound = step * 1.0 + 1e-6
    else:
        # half a step, plus the stored scale's (and zero's) float16 rounding over up to 127 steps
        bound = step * 0.5 + step * 127 * 2**-11 + (0 if zero is None else 2**-10 * w.abs().max())
    assert bool((err <= bound).all()), f"max error {err.max():.3g}"
    assert err.max() < (0.6 if bits == 4 else 0.05)  # and the format actually approximates w


def test_pack_unpack_round_trip_and_layout():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (5, 96), generator=g, dtype=torch.uint8)
    p = quant.pack_int4(u)
    assert p.shape == (5, 48) and torch.equal(p, slow_pack(u.tolist()))
    assert torch.equal(quant.unpack_int4(p), u)
    # one nibble in a known place: k = 32 + 3 -> byte 16 + 3, low; k = 32 + 19 -> same byte, high
    z = torch.zeros(1, 64, dtype=torch.uint8)
    z[0, 35], z[0, 51] = 0xA, 0x5
    assert quant.pack_int4(z)[0].tolist() == [0] * 19 + [0x5A] + [0] * 12


def test_q4_0_sign_rule():
    # the element of largest magnitude gets q = -8 (nibble 0) whatever its sign: one more level
    w = torch.linspace(-1.0, 1.0, 64).reshape(1, 64) * 0.5
    w[0, 5] = -2.0   # group 0: largest is negative -> scale = 2/8 > 0
    w[0, 40] = 2.0   # group 1: largest is positive -> scale = -2/8 < 0
    qweight, scale, _ = quant.quantize_weight(w, 4, 32)
    u = quant.unpack_int4(qweight)
    assert scale.tolist() == [[0.25, -0.25]]
    assert u[0, 5] == 0 and u[0, 40] == 0
    back = quant.dequantize_weight(qweight, scale, None, 4, 32)
    assert back[0, 5] == -2.0 and back[0, 40] == 2.0
    # a tie in magnitude: the first element wins (llama.cpp's strict '<' scan)
    t = torch.zeros(1, 32)
    t[0, 3], t[0, 9] = 1.0, -1.0
    _, s, _ = quant.quantize_weight(t, 4, 32)
    assert s.item() == -0.125


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_zero_scale_groups(fmt):
    bits, group_size, zp = fmt
    w = _weight(3, 128, seed=1)
    w[1] = 0.0  # a zero row (every group of it, and the per-channel scale)
    if group_size is not None:
        w[2, :group_size] = 0.0 if not zp else 0.75  # one zero group (a constant group with zp)
    qweight, scale, zero = quant.quantize_weight(w, bits, group_size, zp)
    assert torch.isfinite(scale).all()
    assert (scale.reshape(3, -1)[1] == 0).all()
    q = qweight if bits == 8 else quant.unpack_int4(qweight)
    assert (q[1] == (0 if bits == 8 else 8)).all()  # q = 0
    back = quant.dequantize_weight(qweight, scale, zero, bits, group_size)
    assert (back[1] == 0).all()
    if group_size is not None:
        assert scale[2, 0] == 0
        assert (back[2, :group_size] == w[2, :group_size]).all()


def test_quantize_accepts_float_dtypes_and_is_deterministic():
    w = _weight(4, 64, seed=3)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        a = quant.quantize_weight(w.to(dt), 8, 32)
        b = quant.quantize_weight(w.to(dt).double(), 8, 32)  # the same values, wider
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("call,exc,words", [
    (lambda: quant.quantize_weight(torch.randn(4, 48), 4, 32), ValueError, ["w", "48", "group_size 32"]),
    (lambda: quant.quantize_weight(torch.randn(4, 96), 4, 64), ValueError, ["w", "96", "group_size 64"]),
    (lambda: quant.quantize_weight(torch.randn(4, 40), 8, 32), ValueError, ["w", "40", "32"]),
    (lambda: quant.quantize_weight(torch.ones(4, 64, dtype=torch.int32), 8, 32), TypeError, ["w", "floating", "int32"]),
    (lambda: quant.quantize_weight(torch.randn(64), 8, None), ValueError, ["w", "2-D", "(64,)"]),
    (lambda: quant.quantize_weight([[1.0]], 8, None), TypeError, ["w", "Tensor", "list"]),
    (lambda: quant.quantize_weight(torch.randn(4, 64), 3, 32), ValueError, ["bits", "(4, 8)", "3"]),
    (lambda: quant.quantize_weight(torch.randn(4, 64), 4, None), ValueError, ["group_size", "None"]),
    (lambda: quant.quantize_weight(torch.randn(4, 64), 8, 16), ValueError, ["group_size", "16"]),
    (lambda: quant.quantize_weight(torch.randn(4, 64), 8, 32, True), ValueError, ["zero_point", "bits=8"]),
    (lambda: quant.quantize_weight(torch.full((2, 32), math.nan), 8, 32), ValueError, ["w", "finite"]),
    (lambda: quant.quantize_weight(torch.full((2, 32), 1e9), 8, 32), ValueError, ["w", "float16"]),
    (lambda: quant.pack_int4(torch.full((2, 32), 16, dtype=torch.uint8)), ValueError, ["u", "0..15", "16"]),
    (lambda: quant.pack_int4(torch.zeros(2, 32, dtype=torch.int8)), TypeError, ["u", "uint8", "int8"]),
    (lambda: quant.pack_int4(torch.zeros(2, 40, dtype=torch.uint8)), ValueError, ["u", "32", "(2, 40)"]),
    (lambda: quant.unpack_int4(torch.zeros(2, 8, dtype=torch.uint8)), ValueError, ["p", "(2, 8)"]),
    (lambda: quant.unpack_int4(torch.zeros(2, 16, dtype=torch.int8)), TypeError, ["p", "uint8", "int8"]),
])
def test_bad_inputs_name_the_argument(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    for word in words:
        assert word in str(e.value), (word, str(e.value))


# ----------------------------------------------------------------------------- ops.quantized_linear

# every backend with the op on CPU except triton (its interpreter runs in tests/test_triton_quant*.py)
BACKENDS = [b for b in available_backends("quantized_linear", include_reference=True, dtype=torch.float32,
                                          bits=8, group_size=None, zero=False, act_int8=False) if b != "triton"]


def test_reference_and_torch_have_the_op():
    assert {"reference", "torch"} <= set(BACKENDS), BACKENDS


def _op_inputs(fmt, lead, K, N, bias, seed, dtype=torch.float32):
    bits, group_size, zp = fmt
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    qweight, scale, zero = quant.quantize_weight(w, bits, group_size, zp)
    return x, qweight, scale, zero, b


def _truth_and_baseline(x, qweight, scale, zero, b, bits, group_size):
    w64 = quant.dequantize_weight(qweight, scale, zero, bits, group_size, torch.float64)
    truth = F.linear(x.double(), w64, None if b is None else b.double())
    # plain PyTorch in x's dtype on the dequantized weight (what the reference backend does), and
    # PyTorch's fused op (torch._weight_int8pack_mm for int8 per channel, the torch backend): its
    # fp32 error is 2-4x the composite's here (measured, K 64..3072), PyTorch's own error too; it
    # joins the baseline only while within TORCH_TRUST x the composite's (gptfast.testing).
    composite = x @ w64.to(x.dtype).t() + (0 if b is None else b)
    fused = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group_size, backend="torch")
    return truth, pytorch_baselines(truth, composite, fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("lead", [(1,), (3,), (16,), (2, 9)], ids=["M1", "M3", "M16", "2x9"])
@pytest.mark.parametrize("K,N", [(128, 37), (384, 129)])
def test_quantized_linear_matches_fp64_truth(backend, fmt, lead, K, N):
    bits, group_size, zp = fmt
    bias = (K + sum(lead)) % 2 == 0
    x, qweight, scale, zero, b = _op_inputs(fmt, lead, K, N, bias, seed=K + N + sum(lead) + bits)
    y = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group_size, backend=backend)
    assert y.dtype == x.dtype and y.shape == (*lead, N)
    truth, baseline = _truth_and_baseline(x, qweight, scale, zero, b, bits, group_size)
    assert_error_within(y, truth, baseline, what=f"{backend} {fmt} lead={lead} K={K} N={N}")


@pytest.mark.parametrize("fmt", FORMATS, ids=FMT_IDS)
def test_reference_takes_fp64_x(fmt):
    bits, group_size, zp = fmt
    x, qweight, scale, zero, b = _op_inputs(fmt, (3,), 128, 17, True, seed=5, dtype=torch.float64)
    for backend in ("reference", "torch"):
        y = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group_size, backend=backend)
        truth, baseline = _truth_and_baseline(x, qweight, scale, zero, b, bits, group_size)
        assert y.dtype == torch.float64
        assert_error_within(y, truth, baseline, what=f"{backend} fp64 {fmt}")


def test_torch_backend_int8_per_channel_uses_weight_int8pack_mm(monkeypatch):
    x, qweight, scale, zero, b = _op_inputs((8, None, False), (4,), 64, 9, True, seed=1)
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a) or real(*a))
    y = ops.quantized_linear(x[:, ::1].t().contiguous().t(), qweight, scale, None, b, bits=8, group_size=None,
                             backend="torch")  # a column-major x: made last-dim contiguous first
    assert len(calls) == 1
    truth, baseline = _truth_and_baseline(x, qweight, scale, zero, b, 8, None)
    assert_error_within(y, truth, baseline, what="torch int8 per channel")
    # a prompt pass (more than 16 rows) dequantizes instead (that kernel is ~30x slower there)
    before = len(calls)
    ops.quantized_linear(torch.randn(17, 64), qweight, scale, None, b, bits=8, group_size=None, backend="torch")
    assert len(calls) == before


def test_act_int8_is_passed_and_ignored_by_weight_only_backends():
    fmt = (8, 32, False)
    x, qweight, scale, zero, b = _op_inputs(fmt, (2,), 64, 5, False, seed=2)
    for backend in ("reference", "torch"):
        a = ops.quantized_linear(x, qweight, scale, bits=8, group_size=32, backend=backend)
        c = ops.quantized_linear(x, qweight, scale, bits=8, group_size=32, act_int8=True, backend=backend)
        assert torch.equal(a, c)


def test_resolve_receives_the_call_keys(monkeypatch):
    from gptfast.ops import torch_ops

    seen = {}
    monkeypatch.setattr(torch_ops, "unsupported", lambda op, **call: seen.setdefault(op, call) and None)
    x, qweight, scale, zero, b = _op_inputs((4, 64, True), (2,), 128, 5, False, seed=3)
    ops.quantized_linear(x, qweight, scale, zero, bits=4, group_size=64, act_int8=True, backend="torch")
    assert seen["quantized_linear"] == dict(device_type="cpu", dtype=torch.float32, bits=4, group_size=64,
                                           zero=True, act_int8=True)


def _valid():
    x, qweight, scale, zero, b = _op_inputs((4, 32, True), (2,), 64, 5, True, seed=4)
    return dict(x=x, qweight=qweight, scale=scale, zero=zero, bias=b, bits=4, group_size=32)


@pytest.mark.parametrize("change,exc,words", [
    (dict(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, ["x", "floating", "int32"]),
    (dict(x=torch.randn(2, 63)), ValueError, ["x", "(..., 64)", "(2, 63)"]),
    (dict(qweight=torch.zeros(5, 32, dtype=torch.int8)), TypeError, ["qweight", "torch.uint8", "int8"]),
    (dict(qweight=torch.zeros(5, 24, dtype=torch.uint8)), ValueError, ["qweight", "48"]),
    (dict(qweight=torch.zeros(5, 64, dtype=torch.uint8)[:, ::2]), ValueError, ["qweight", "contiguous"]),
    (dict(scale=torch.ones(5, 2)), TypeError, ["scale", "float16", "float32"]),
    (dict(scale=torch.ones(5, 3, dtype=torch.float16)), ValueError, ["scale", "(5, 2)", "(5, 3)"]),
    (dict(zero=torch.ones(5, 2)), TypeError, ["zero", "float16", "float32"]),
    (dict(zero=torch.ones(4, 2, dtype=torch.float16)), ValueError, ["zero", "(5, 2)", "(4, 2)"]),
    (dict(bias=torch.ones(5, dtype=torch.float64)), TypeError, ["bias", "float32", "float64"]),
    (dict(bias=torch.ones(6)), ValueError, ["bias", "(5,)", "(6,)"]),
    (dict(bits=3), ValueError, ["bits", "3"]),
    (dict(group_size=None), ValueError, ["group_size", "None"]),
    (dict(group_size=48), ValueError, ["group_size", "48"]),
    (dict(act_int8=1), TypeError, ["act_int8", "bool", "int"]),
])
def test_quantized_linear_bad_inputs_name_the_argument(change, exc, words):
    kw = _valid() | change
    x, qweight, scale, zero, bias = (kw.pop(k) for k in ("x", "qweight", "scale", "zero", "bias"))
    with pytest.raises(exc) as e:
        ops.quantized_linear(x, qweight, scale, zero, bias, backend="reference", **kw)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_int8_per_channel_scale_must_be_float32():
    x, qweight, scale, zero, b = _op_inputs((8, None, False), (2,), 64, 5, False, seed=6)
    with pytest.raises(TypeError, match=r"scale must be torch.float32 \(per channel\), got dtype torch.float16"):
        ops.quantized_linear(x, qweight, scale.half(), bits=8, group_size=None)
    with pytest.raises(ValueError, match=r"zero_point is an int4 option"):
        ops.quantized_linear(x, qweight, scale, scale, bits=8, group_size=None)
