"""The native backend's CUDA kernels (csrc/cuda) against the reference ops, forward and backward.

GPU only (`@pytest.mark.gpu`; skipped with the reason on machines without CUDA). The library ops
`torch.ops.gptfast.*` are called directly (their CUDA kernels are registered by
csrc/cuda/bindings.cpp; autograd of the *_fwd ops by gptfast/ops/native/_meta.py), so these tests do
not depend on which backend `auto` would pick.

Tolerances follow FlashAttention's rule everywhere, fp32 included: the kernel's max error against
an fp64 computation from the same inputs must be at most 2x the error of plain PyTorch computing
in the kernel's dtype, plus a small atol (`tests.helpers.assert_error_within`). The atol covers
outputs where PyTorch's own error happens to be 0 (a few ulps of the dtype at |x| ~ 1).
Shapes are the ones that break tilings: T in 1, 17, 65, 129, 1025; N in 1, 80, 768, 1600, 6145.

Run under compute-sanitizer: benchmarks/run_compute_sanitizer.sh.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast.ops import reference
from tests.helpers import assert_close, assert_error_within

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# atol per dtype: a few ulps at |x| ~ 1 (fp32 2^-23, fp16 2^-10, bf16 2^-7).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OPS = ["causal_attention_fwd", "causal_attention_bwd", "layer_norm_fwd", "layer_norm_bwd", "gelu_mlp_fwd",
       "gelu_mlp_bwd", "decode_attention", "sample"]


@pytest.fixture(scope="module", autouse=True)
def native_cuda():
    """Load (JIT-build if needed) the native library: on a GPU machine a failed build is an error."""
    from gptfast.ops import native

    native.load_extension()
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gptfast::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}: was the extension built with CUDA?"
    return torch.ops.gptfast


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=DEV, dtype=dtype)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dout)


def _check(name, ours, want64, base, dtype):
    assert ours.dtype == base.dtype, f"{name}: dtype {ours.dtype} != {base.dtype}"
    assert torch.isfinite(ours.float()).all(), f"{name}: non-finite values"
    assert_error_within(ours, want64, base, factor=2.0, atol=ATOL[dtype], what=name)


# ----------------------------------------------------------------------------- causal attention


def _naive_attention(q, k, v, scale):
    """Attention computed entirely in q's dtype (FlashAttention's low-precision baseline)."""
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


ATTN_SHAPES = [(1, 1, 1, 64), (2, 3, 17, 16), (1, 2, 65, 32), (2, 2, 129, 64), (1, 2, 1025, 128), (1, 1, 257, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T,D", ATTN_SHAPES)
def test_causal_attention_fwd_bwd(native_cuda, B, H, T, D, dtype):
    scale = 1.0 / math.sqrt(D)
    q, k, v = (_randn(B, H, T, D, dtype=dtype, seed=s) for s in (1, 2, 3))
    dout = _randn(B, H, T, D, dtype=dtype, seed=4)
    out, (dq, dk, dv) = _grads(lambda a, b, c: native_cuda.causal_attention_fwd(a, b, c, scale)[0], [q, k, v], dout)
    ref, ref_g = _grads(lambda a, b, c: reference.causal_attention(a, b, c, scale), [t.double() for t in (q, k, v)],
                        dout.double())
    base, base_g = _grads(lambda a, b, c: _naive_attention(a, b, c, scale), [q, k, v], dout)
    _check("out", out, ref, base, dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, base_g):
        _check(name, g, r, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_attention_lse(native_cuda, dtype):
    B, H, T, D = 2, 3, 97, 64
    q, k, v = (_randn(B, H, T, D, dtype=dtype, seed=s) for s in (5, 6, 7))
    scale = 0.3
    _, lse = native_cuda.causal_attention_fwd(q, k, v, scale)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
    # Scores are exact products of the (low-precision) inputs accumulated in fp32.
    assert_close(lse, torch.logsumexp(s, dim=-1), atol=1e-4, rtol=1e-5, what="lse")


def test_causal_attention_strided_qkv(native_cuda):
    """q, k, v as views of one (B, T, 3, H, D) buffer (GPT-2's c_attn split): no copy needed."""
    B, T, H, D = 2, 77, 4, 32
    qkv = _randn(B, T, 3, H, D, dtype=torch.float16, seed=8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), non-contiguous
    assert not q.is_contiguous()
    out, _ = native_cuda.causal_attention_fwd(q, k, v, 0.125)
    out_c, _ = native_cuda.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    assert torch.equal(out, out_c), "strided and contiguous inputs must give identical results"
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.125)
    _check("out", out, ref, _naive_attention(q, k, v, 0.125), torch.float16)


def test_causal_attention_bwd_deterministic(native_cuda):
    q, k, v = (_randn(1, 2, 300, 64, dtype=torch.bfloat16, seed=s) for s in (9, 10, 11))
    out, lse = native_cuda.causal_attention_fwd(q, k, v, 0.125)
    dout = _randn(1, 2, 300, 64, dtype=torch.bfloat16, seed=12)
    a = native_cuda.causal_attention_bwd(dout, q, k, v, out, lse, 0.125)
    b = native_cuda.causal_attention_bwd(dout, q, k, v, out, lse, 0.125)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "backward must be bitwise reproducible (no atomics)"


def test_causal_attention_input_errors(native_cuda):
    q = _randn(1, 1, 8, 48, dtype=torch.float16, seed=0)
    with pytest.raises(RuntimeError, match=r"head dim D must be one of 16, 32, 64, 128 on CUDA, got 48"):
        native_cuda.causal_attention_fwd(q, q, q, 0.1)
    q = _randn(1, 1, 8, 64, dtype=torch.float16, seed=0)
    with pytest.raises(RuntimeError, match=r"k must have q's dtype"):
        native_cuda.causal_attention_fwd(q, q.float(), q, 0.1)
    with pytest.raises(RuntimeError, match=r"v must have shape"):
        native_cuda.causal_attention_fwd(q, q, q[:, :, :4], 0.1)
    with pytest.raises(RuntimeError, match=r"q must be float32, float16 or bfloat16"):
        native_cuda.causal_attention_fwd(q.double(), q.double(), q.double(), 0.1)


# ----------------------------------------------------------------------------- layer norm

LN_SHAPES = [(1, 1), (17, 80), (65, 768), (1023, 1600), (5, 6145), (3, 1001)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", LN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_fwd_bwd(native_cuda, M, N, dtype, affine):
    x = _randn(M, N, dtype=dtype, seed=1, scale=2.0) + 0.5
    w = _randn(N, dtype=dtype, seed=2) if affine else None
    b = _randn(N, dtype=dtype, seed=3) if affine else None
    dy = _randn(M, N, dtype=dtype, seed=4)
    inputs = [x, w, b] if affine else [x]

    def ours(x, w=None, b=None):
        return native_cuda.layer_norm_fwd(x, w, b, 1e-5)[0]

    def ref(x, w=None, b=None):
        return reference.layer_norm(x, w, b, 1e-5)

    def torch_ln(x, w=None, b=None):
        return F.layer_norm(x, (N,), w, b, 1e-5)

    y, g = _grads(ours, inputs, dy)
    y64, g64 = _grads(ref, [t.double() for t in inputs], dy.double())
    yb, gb = _grads(torch_ln, inputs, dy)
    _check("y", y, y64, yb, dtype)
    for name, a, r, bb in zip(("dx", "dweight", "dbias"), g, g64, gb):
        _check(name, a, r, bb, dtype)


def test_layer_norm_stats_and_no_weight_grads(native_cuda):
    x = _randn(33, 200, dtype=torch.float32, seed=5)
    _, mean, rstd = native_cuda.layer_norm_fwd(x, None, None, 1e-5)
    x64 = x.double()
    assert_close(mean, x64.mean(-1), atol=1e-6, rtol=1e-6, what="mean")
    assert_close(rstd, torch.rsqrt(x64.var(-1, unbiased=False) + 1e-5), atol=1e-6, rtol=1e-5, what="rstd")
    # Without weight / bias, dweight / dbias are still returned (as if weight = 1, bias = 0).
    dy = _randn(33, 200, dtype=torch.float32, seed=6)
    _, dw, db = native_cuda.layer_norm_bwd(dy, x, None, mean, rstd)
    xhat = (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert_close(dw, (dy.double() * xhat).sum(0), atol=1e-4, rtol=1e-5, what="dweight")
    assert_close(db, dy.double().sum(0), atol=1e-4, rtol=1e-5, what="dbias")


def test_layer_norm_misaligned_rows_use_scalar_path(native_cuda):
    """A storage offset of one element breaks 16-byte alignment: the scalar path must be as exact."""
    M, N = 9, 768
    buf = _randn(M * N + 1, dtype=torch.float16, seed=7)
    x = buf[1:].view(M, N)
    assert x.data_ptr() % 16 != 0
    w, b = _randn(N, dtype=torch.float16, seed=8), _randn(N, dtype=torch.float16, seed=9)
    y, _, _ = native_cuda.layer_norm_fwd(x, w, b, 1e-5)
    y64 = reference.layer_norm(x.double(), w.double(), b.double(), 1e-5)
    _check("y (misaligned)", y, y64, F.layer_norm(x, (N,), w, b, 1e-5), torch.float16)


def test_layer_norm_bwd_deterministic(native_cuda):
    x, dy = _randn(4097, 768, dtype=torch.float32, seed=8), _randn(4097, 768, dtype=torch.float32, seed=9)
    w = _randn(768, dtype=torch.float32, seed=10)
    _, mean, rstd = native_cuda.layer_norm_fwd(x, w, None, 1e-5)
    a = native_cuda.layer_norm_bwd(dy, x, w, mean, rstd)
    b = native_cuda.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(p, q) for p, q in zip(a, b)), "dweight / dbias must be bitwise reproducible"


def test_layer_norm_input_errors(native_cuda):
    x = _randn(4, 8, dtype=torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\], got \[7\]"):
        native_cuda.layer_norm_fwd(x, torch.ones(7, device=DEV), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must have x's dtype"):
        native_cuda.layer_norm_fwd(x, None, torch.ones(8, device=DEV, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match=r"x must be 2-D"):
        native_cuda.layer_norm_fwd(x.view(2, 2, 8), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"eps must be a positive finite number"):
        native_cuda.layer_norm_fwd(x, None, None, 0.0)


# ----------------------------------------------------------------------------- gelu mlp

MLP_SHAPES = [(1, 64, 256, 64), (17, 80, 321, 80), (65, 768, 3072, 768), (33, 48, 200, 24)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C,Fh,C_out", MLP_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_fwd_bwd(native_cuda, M, C, Fh, C_out, dtype, bias):
    x = _randn(M, C, dtype=dtype, seed=1)
    w_fc = _randn(Fh, C, dtype=dtype, seed=2, scale=C**-0.5)
    w_proj = _randn(C_out, Fh, dtype=dtype, seed=3, scale=Fh**-0.5)
    b_fc = _randn(Fh, dtype=dtype, seed=4) if bias else None
    b_proj = _randn(C_out, dtype=dtype, seed=5) if bias else None
    dy = _randn(M, C_out, dtype=dtype, seed=6)
    inputs = [x, w_fc, w_proj] + ([b_fc, b_proj] if bias else [])

    def call(fn):
        def f(x, w_fc, w_proj, b_fc=None, b_proj=None):
            return fn(x, w_fc, b_fc, w_proj, b_proj)

        return f

    y, g = _grads(call(lambda *a: native_cuda.gelu_mlp_fwd(*a)[0]), inputs, dy)
    y64, g64 = _grads(call(reference.gelu_mlp), [t.double() for t in inputs], dy.double())
    yb, gb = _grads(call(reference.gelu_mlp), inputs, dy)  # plain PyTorch in the same dtype
    _check("y", y, y64, yb, dtype)
    for name, a, r, bb in zip(("dx", "dw_fc", "dw_proj", "db_fc", "db_proj"), g, g64, gb):
        _check(name, a, r, bb, dtype)


def test_gelu_mlp_pre_is_preactivation(native_cuda):
    x, w = _randn(7, 40, dtype=torch.float32, seed=1), _randn(96, 40, dtype=torch.float32, seed=2)
    wp = _randn(40, 96, dtype=torch.float32, seed=3)
    b = _randn(96, dtype=torch.float32, seed=4)
    _, pre = native_cuda.gelu_mlp_fwd(x, w, b, wp, None)
    assert_close(pre, x.double() @ w.double().t() + b.double(), atol=1e-4, rtol=1e-5, what="pre")


def test_gelu_mlp_input_errors(native_cuda):
    x = _randn(4, 8, dtype=torch.float32, seed=0)
    w_fc, w_proj = _randn(16, 8, dtype=torch.float32, seed=1), _randn(8, 16, dtype=torch.float32, seed=2)
    with pytest.raises(RuntimeError, match=r"w_fc must have shape \(F, 8\)"):
        native_cuda.gelu_mlp_fwd(x, w_fc[:, :7], None, w_proj, None)
    with pytest.raises(RuntimeError, match=r"b_fc must have shape \[16\]"):
        native_cuda.gelu_mlp_fwd(x, w_fc, torch.zeros(15, device=DEV), w_proj, None)
    with pytest.raises(RuntimeError, match=r"w_proj must have x's dtype"):
        native_cuda.gelu_mlp_fwd(x, w_fc, None, w_proj.half(), None)


# ----------------------------------------------------------------------------- decode attention


def _decode_case(B, H, Tq, T_max, D, dtype, lens, seed):
    q = _randn(B, H, Tq, D, dtype=dtype, seed=seed)
    k = _randn(B, H, T_max, D, dtype=dtype, seed=seed + 1)
    v = _randn(B, H, T_max, D, dtype=dtype, seed=seed + 2)
    cache_lens = torch.tensor(lens, device=DEV, dtype=torch.int64)
    for b, n in enumerate(lens):  # garbage past the valid length must never be read
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("inf")
    return q, k, v, cache_lens


def _naive_decode(q, k, v, lens, scale):
    """Masked attention computed in q's dtype (the low-precision baseline)."""
    B, H, Tq, D = q.shape
    T_max = k.shape[2]
    k_pos = torch.arange(T_max, device=q.device).view(1, 1, 1, T_max)
    q_pos = lens.view(B, 1, 1, 1) - Tq + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    valid = (k_pos < lens.view(B, 1, 1, 1)).view(B, 1, T_max, 1)
    kz, vz = k.masked_fill(~valid, 0), v.masked_fill(~valid, 0)
    s = ((q @ kz.transpose(-2, -1)) * scale).masked_fill(k_pos > q_pos, float("-inf"))
    return torch.softmax(s, dim=-1) @ vz


DECODE_CASES = [
    (1, 1, 1, 1, 64, [1]),
    (3, 2, 1, 17, 16, [1, 9, 17]),
    (2, 12, 4, 1025, 64, [4, 1025]),
    (2, 3, 3, 4096, 128, [4096, 2049]),
    (1, 2, 2, 300, 32, [257]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Tq,T_max,D,lens", DECODE_CASES)
def test_decode_attention(native_cuda, B, H, Tq, T_max, D, lens, dtype):
    q, k, v, cache_lens = _decode_case(B, H, Tq, T_max, D, dtype, lens, seed=T_max + D)
    scale = 1.0 / math.sqrt(D)
    out = native_cuda.decode_attention(q, k, v, cache_lens, scale)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), cache_lens, scale)
    _check("out", out, ref, _naive_decode(q, k, v, cache_lens, scale), dtype)
    # int32 lengths and strided caches (a (B, T_max, H, D) buffer viewed as (B, H, T_max, D)).
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out2 = native_cuda.decode_attention(q, kt, vt, cache_lens.int(), scale)
    assert torch.equal(out, out2), "int32 lens / strided caches must give identical results"


def test_decode_attention_matches_causal_rows(native_cuda):
    """With cache_lens = T the last Tq rows of causal attention are exactly decode's output."""
    B, H, T, D = 2, 4, 333, 64
    q, k, v = (_randn(B, H, T, D, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    full, _ = native_cuda.causal_attention_fwd(q, k, v, 0.125)
    lens = torch.full((B,), T, device=DEV, dtype=torch.int64)
    out = native_cuda.decode_attention(q[:, :, -3:].contiguous(), k, v, lens, 0.125)
    # fp32 both, different summation order (split-K vs one pass): agreement to ~1e-5.
    assert_close(out, full[:, :, -3:], atol=1e-5, rtol=1e-5, what="decode vs causal rows")


def test_decode_attention_input_errors(native_cuda):
    q = _randn(1, 2, 5, 64, dtype=torch.float16, seed=0)
    kc = _randn(1, 2, 32, 64, dtype=torch.float16, seed=1)
    lens = torch.tensor([32], device=DEV)
    with pytest.raises(RuntimeError, match=r"1\.\.4 query tokens \(Tq\) on CUDA, got Tq=5"):
        native_cuda.decode_attention(q, kc, kc, lens, 0.1)
    with pytest.raises(RuntimeError, match=r"cache_lens must be int64 \(or int32\)"):
        native_cuda.decode_attention(q[:, :, :1], kc, kc, lens.float(), 0.1)
    with pytest.raises(RuntimeError, match=r"k_cache must have shape \(1, 2, T_max, 64\)"):
        native_cuda.decode_attention(q[:, :, :1], kc[:, :1], kc, lens, 0.1)


# ----------------------------------------------------------------------------- sampling

SAMPLE_CASES = [(1.0, None, None), (0.7, 50, None), (1.3, None, 0.9), (1.0, 40, 0.5), (0.9, 1, None),
                (1.0, None, 1.0), (2.0, 1000, 0.95)]


def _logits(B, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3.0
    logits[0, :20] = 4.0  # exact ties (also at the top-k boundary for small k)
    logits[1, 7] = float("-inf")
    return logits.to(DEV)


def _ours(op, logits, temperature, top_k, top_p, u):
    return op.sample(logits, float(temperature), 0 if top_k is None else top_k, 1.0 if top_p is None else top_p, u)


@pytest.mark.parametrize("V", [65, 50257])
@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLE_CASES)
def test_sample_matches_reference(native_cuda, V, temperature, top_k, top_p):
    B = 64
    logits = _logits(B, V, seed=V + int(10 * temperature))
    g1 = torch.Generator(device=DEV).manual_seed(11)
    g2 = torch.Generator(device=DEV).manual_seed(11)
    want = reference.sample(logits, temperature, top_k, top_p, g1)
    u = torch.rand(B, generator=g2, device=DEV, dtype=torch.float32)
    got = _ours(native_cuda, logits, temperature, top_k, top_p, u)
    assert got.dtype == torch.int64 and got.shape == (B,)
    bad = (got != want).nonzero().flatten().tolist()
    if bad:
        # Allowed only where u * total lies within rounding of a CDF boundary (fp64 masses here vs
        # the reference's fp32 cumsum): then both tokens are right by the rule.
        probs = reference.sampling_filter(logits.double(), temperature, top_k, top_p).double()
        cdf = probs.cumsum(-1)
        for r in bad:
            t = int(got[r])
            target = float(u[r]) * float(cdf[r, -1])
            lo = float(cdf[r, t - 1]) if t > 0 else 0.0
            assert probs[r, t] > 0, f"row {r}: sampled token {t} was filtered out (reference {int(want[r])})"
            assert lo - 1e-5 <= target <= float(cdf[r, t]) + 1e-5, (
                f"row {r}: token {t} (cdf [{lo:.8f}, {float(cdf[r, t]):.8f}]) does not contain u*total={target:.8f}; "
                f"reference picked {int(want[r])}"
            )
        assert len(bad) <= 2, f"{len(bad)} of {B} rows differ from the reference: {bad}"


def test_sample_first_kept_token_and_greedy(native_cuda):
    logits = _logits(8, 1000, seed=3)
    # u = 0 selects the first kept token in vocabulary order: checks the top-k / top-p kept sets.
    u = torch.zeros(8, device=DEV)
    for top_k, top_p in [(5, None), (None, 0.3), (30, 0.6), (1, None)]:
        probs = reference.sampling_filter(logits, 1.0, top_k, top_p)
        first = (probs > 0).int().argmax(-1)
        got = _ours(native_cuda, logits, 1.0, top_k, top_p, u)
        assert torch.equal(got, first), f"top_k={top_k} top_p={top_p}: {got.tolist()} != {first.tolist()}"
    # temperature 0: argmax, first of ties; a NaN wins as in torch.argmax.
    logits[2, 100] = float("nan")
    got = _ours(native_cuda, logits, 0.0, None, None, u)
    assert torch.equal(got, logits.argmax(-1)), f"{got.tolist()} != {logits.argmax(-1).tolist()}"
    got16 = _ours(native_cuda, logits.half(), 0.0, None, None, u)
    assert torch.equal(got16, logits.half().argmax(-1))


def test_sample_input_errors(native_cuda):
    logits = torch.randn(2, 10, device=DEV)
    with pytest.raises(RuntimeError, match=r"uniform must have shape \[2\]"):
        native_cuda.sample(logits, 1.0, 0, 1.0, torch.rand(3, device=DEV))
    with pytest.raises(RuntimeError, match=r"uniform must be float32"):
        native_cuda.sample(logits, 1.0, 0, 1.0, torch.rand(2, device=DEV, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"temperature must be a finite number >= 0"):
        native_cuda.sample(logits, -1.0, 0, 1.0, torch.rand(2, device=DEV))
