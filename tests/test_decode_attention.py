"""Decode attention (a few new queries against a KV cache with per-sequence lengths): every
backend against the reference, and the native CPU kernel (csrc/cpu/decode_attention.cpp) at the
length boundaries, with garbage past the valid length, strided caches and split-K."""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.ops import reference
from tests.helpers import assert_close, available_backends

# fp32 vs an fp64 reference: a dot product over D and a weighted sum over <= T_max positions in
# fp32 (other summation order, ~2 ulp exp); observed errors ~1e-7 for outputs of order 1, so
# 2e-5 has margin and still catches an off-by-one position (an error of order 1e-2 or more).
ATOL32, RTOL32 = 2e-5, 2e-5


def _native_or_fail() -> None:
    reason = ops.unavailable_reason("native", "decode_attention", "cpu")
    if reason is not None:
        pytest.fail(f"native backend must build on CPU: {reason}")


def _case(B, H, Tq, T_max, D, lens, seed=0, dtype=torch.float32, garbage=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, T_max, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, T_max, D, generator=g, dtype=dtype)
    cache_lens = torch.tensor(lens, dtype=torch.int64)
    if garbage is not None:  # poison every position at or past the valid length
        for b, L in enumerate(lens):
            k[b, :, L:] = garbage
            v[b, :, L:] = garbage
    return q, k, v, cache_lens


def _ref64(q, k, v, lens, scale=None):
    # Clean the caches past the valid length first: the fp64 truth must not depend on garbage.
    k, v = k.double().clone(), v.double().clone()
    for b, L in enumerate(lens.tolist()):
        k[b, :, L:] = 0
        v[b, :, L:] = 0
    return reference.decode_attention(q.double(), k, v, lens, scale)


@pytest.mark.parametrize("backend", available_backends("decode_attention", dtype=torch.float32, head_dim=64))
@pytest.mark.parametrize("Tq", [1, 3])
def test_backend_matches_reference(backend, Tq):
    q, k, v, lens = _case(3, 2, Tq, 100, 64, [100, 37, Tq])
    out = ops.decode_attention(q, k, v, lens, backend=backend)
    assert_close(out, _ref64(q, k, v, lens), ATOL32, RTOL32, f"{backend} Tq={Tq}")


def test_native_is_available_for_decode():
    _native_or_fail()
    assert "native" in available_backends("decode_attention", dtype=torch.float32, head_dim=64)


@pytest.mark.parametrize("Tq", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "B,H,T_max,D,lens",
    [
        (1, 12, 1024, 64, [1024]),  # full cache, B * H = 12
        (2, 3, 257, 32, [4, 257]),  # shortest possible with Tq = 4 and the full length
        (3, 2, 200, 80, [65, 127, 129]),  # lengths ending mid-chunk / just past a chunk
        (1, 1, 1000, 16, [999]),  # one head: the cache length is split across tasks (split-K)
        (2, 1, 9, 128, [4, 9]),
        (1, 2, 150, 20, [150]),  # D not a multiple of 8: the scalar fp32 path
        (2, 2, 140, 200, [70, 140]),  # D = 3 * 64 + 8: register blocks of 64 columns plus a tail
    ],
)
def test_native_matches_reference(B, H, T_max, D, lens, Tq):
    _native_or_fail()
    q, k, v, cl = _case(B, H, Tq, T_max, D, lens)
    out = ops.decode_attention(q, k, v, cl, backend="native")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, _ref64(q, k, v, cl), ATOL32, RTOL32, f"({B},{H},{Tq},{T_max},{D}) lens={lens}")


@pytest.mark.parametrize(
    "backend", available_backends("decode_attention", dtype=torch.float32, head_dim=32, include_reference=True))
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_garbage_past_valid_length_does_not_leak(backend, garbage):
    # The cache past each row's length is unwritten memory: no backend may let it reach the output
    # (SDPA with a mask alone does: a masked weight 0 times a NaN value row is NaN).
    q, k, v, cl = _case(3, 2, 2, 300, 32, [2, 150, 299], garbage=garbage)
    out = ops.decode_attention(q, k, v, cl, backend=backend)
    assert torch.isfinite(out).all(), f"{backend}: garbage {garbage} leaked"
    assert_close(out, _ref64(q, k, v, cl), ATOL32, RTOL32, f"{backend}: garbage {garbage}")


def test_garbage_test_covers_every_backend():
    # The parametrization above must include all four backends on CPU (Triton via the interpreter).
    got = available_backends("decode_attention", dtype=torch.float32, head_dim=32, include_reference=True)
    assert set(got) == {"reference", "torch", "native", "triton"}, got


def test_length_one():
    """cache_lens = 1 with Tq = 1: the only visible position is 0, so the output is v[:, :, 0]."""
    _native_or_fail()
    q, k, v, cl = _case(2, 3, 1, 50, 16, [1, 1], garbage=float("nan"))
    out = ops.decode_attention(q, k, v, cl, backend="native")
    assert_close(out, v[:, :, :1], 0, 0, "length 1")


def test_decode_equals_causal_attention_rows():
    """Independent check: decoding the last Tq tokens of a full prefix = those rows of causal attention."""
    _native_or_fail()
    B, H, T, D, Tq = 2, 3, 70, 32, 3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    full = reference.causal_attention(q, k, v)
    T_max = 90
    kc = torch.full((B, H, T_max, D), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    kc[:, :, :T], vc[:, :, :T] = k, v
    lens = torch.tensor([T, T])
    out = ops.decode_attention(q[:, :, -Tq:], kc, vc, lens, backend="native")
    assert_close(out, full[:, :, -Tq:], 1e-12, 1e-12, "decode vs causal rows (fp64)")


def test_strided_caches_and_int32_lens():
    """Caches stored (B, T_max, H, D) and viewed as (B, H, T_max, D); int32 lengths."""
    _native_or_fail()
    B, H, T_max, D = 2, 4, 130, 32
    g = torch.Generator().manual_seed(5)
    kc = torch.randn(B, T_max, H, D, generator=g).transpose(1, 2)
    vc = torch.randn(B, T_max, H, D, generator=g).transpose(1, 2)
    q = torch.randn(B, T_max, H, D, generator=g).transpose(1, 2)[:, :, :2]  # (B, H, 2, D), strided
    lens = torch.tensor([77, 130], dtype=torch.int32)
    out = ops.decode_attention(q, kc, vc, lens, backend="native")
    assert_close(out, _ref64(q, kc, vc, lens), ATOL32, RTOL32, "strided")
    # A cache whose last dim is strided is copied by the op, still correct.
    kt = torch.randn(B, H, D, T_max, generator=g).transpose(2, 3)
    out2 = ops.decode_attention(q, kt, vc, lens, backend="native")
    assert_close(out2, _ref64(q, kt, vc, lens), ATOL32, RTOL32, "strided last dim")


def test_fp64_and_custom_scale():
    _native_or_fail()
    q, k, v, cl = _case(2, 2, 2, 80, 16, [80, 5], dtype=torch.float64)
    out = ops.decode_attention(q, k, v, cl, scale=0.7, backend="native")
    assert_close(out, _ref64(q, k, v, cl, 0.7), 1e-12, 1e-12, "fp64 scale 0.7")


def test_split_k_with_one_thread_and_many():
    """The split count depends on the thread count: results must not."""
    _native_or_fail()
    q, k, v, cl = _case(1, 1, 1, 2048, 64, [1500])
    want = _ref64(q, k, v, cl)
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 8):
            torch.set_num_threads(n)
            assert_close(ops.decode_attention(q, k, v, cl, backend="native"), want, ATOL32, RTOL32, f"{n} threads")
    finally:
        torch.set_num_threads(old)


def test_opcheck_decode():
    _native_or_fail()
    q, k, v, cl = _case(2, 2, 2, 40, 16, [40, 7])
    torch.library.opcheck(torch.ops.gptfast.decode_attention.default, (q, k, v, cl, 0.25))


# ----------------------------------------------------------------------------- errors


def test_dispatch_errors():
    q, k, v, cl = _case(2, 2, 1, 10, 16, [5, 10])
    with pytest.raises(ValueError, match="cache_lens must be in"):
        ops.decode_attention(q, k, v, torch.tensor([5, 11]), backend="native")
    with pytest.raises(ValueError, match="int32/int64"):
        ops.decode_attention(q, k, v, cl.float(), backend="native")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ops.decode_attention(q, k, v, cl[:1], backend="native")
    with pytest.raises(ValueError, match="k_cache and v_cache must have shape"):
        ops.decode_attention(q, k[:, :, :, :8], v, cl, backend="native")
    with pytest.raises(ValueError, match="4-D"):
        ops.decode_attention(q[0], k, v, cl, backend="native")
    with pytest.raises(TypeError, match="dtype"):
        ops.decode_attention(q, k.double(), v, cl, backend="native")


def test_cpp_op_errors():
    """Direct calls of the C++ op with bad input raise RuntimeError with the op's message."""
    _native_or_fail()
    op = torch.ops.gptfast.decode_attention
    q, k, v, cl = _case(2, 2, 1, 10, 16, [5, 10])
    with pytest.raises(RuntimeError, match=r"cache_lens\[1\] must be in \[Tq=1, T_max=10\], got 11"):
        op(q, k, v, torch.tensor([5, 11]), 0.25)
    with pytest.raises(RuntimeError, match=r"cache_lens\[0\] must be in"):
        op(q, k, v, torch.tensor([0, 3]), 0.25)
    with pytest.raises(RuntimeError, match="cache_lens must be int64"):
        op(q, k, v, cl.int(), 0.25)
    with pytest.raises(RuntimeError, match=r"cache_lens must have shape \(2\)"):
        op(q, k, v, cl[:1], 0.25)
    with pytest.raises(RuntimeError, match="k_cache must have shape"):
        op(q, k[:1], v, cl, 0.25)
    with pytest.raises(RuntimeError, match="v_cache must have shape"):
        op(q, k, v[:, :, :, :8], cl, 0.25)
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        op(q[0], k, v, cl, 0.25)
    with pytest.raises(RuntimeError, match="query tokens"):
        op(torch.randn(2, 2, 11, 16), k, v, cl, 0.25)
    with pytest.raises(RuntimeError, match="k_cache must have q's dtype"):
        op(q, k.double(), v, cl, 0.25)
