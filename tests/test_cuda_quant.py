"""The native CUDA quantized linear (csrc/cuda/quant_linear.cu, issue #20) through the dispatch layer.

GPU only (`@pytest.mark.gpu`; skipped with the reason where no CUDA device exists). On machines
without a GPU the same kernel runs on the CPU under cudashim (tests/test_cuda_shim.py, driver
tests/cuda_cpu/quant_linear.cpp, every mode); here the compiled kernel is checked on a GPU:
`ops.quantized_linear(..., backend="native")` on CUDA tensors against the fp64 truth (x @ the
dequantized weight + bias) by the project's rule (2x the `reference` backend's error in x's dtype).
"""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.ops import quant
from tests.helpers import assert_error_within

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DEV = "cuda"
FORMATS = {
    "int8": (8, None, False),
    "int8-g32": (8, 32, False),
    "int8-g128": (8, 128, False),
    "int4-g32": (4, 32, False),
    "int4-g64-zp": (4, 64, True),
    "int4-g128": (4, 128, False),
}


@pytest.fixture(scope="module", autouse=True)
def native_cuda():
    """Load (JIT-build if needed) the native library: on a GPU machine a failed build is an error."""
    from gptfast.ops import native

    native.load_extension()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gptfast::quantized_linear", "CUDA"), (
        "no CUDA kernel registered for gptfast::quantized_linear: was the extension built with CUDA?")
    return torch.ops.gptfast


def _make(fmt, M, N, K, dtype, bias, seed=0):
    bits, group, zp = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K ** -0.5 + (0.2 if zp else 0.0)
    qweight, scale, zero = (None if t is None else t.to(DEV) for t in quant.quantize_weight(w, bits, group, zp))
    x = torch.randn(M, K, generator=g).to(device=DEV, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=DEV, dtype=dtype) if bias else None
    return x, qweight, scale, zero, b, bits, group


def _check(x, qweight, scale, zero, b, bits, group, what):
    y = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="native")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qweight.shape[0])
    w = quant.dequantize_weight(qweight, scale, zero, bits, group, torch.float64)
    truth = x.double() @ w.t() + (0 if b is None else b.double())
    base = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="reference")
    assert_error_within(y, truth, base, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("M", [1, 2, 3, 8, 16, 17, 40])
def test_native_cuda_matches_truth(fmt, M, dtype):
    bits, group, _ = FORMATS[fmt]
    for N, K in ((37, 384), (2304, 768), (768, 3072)):
        args = _make(fmt, M, N, K, dtype, bias=N != 37)
        _check(*args, what=f"native cuda {fmt} M{M} N{N} K{K} {dtype}")


def test_scalar_paths_misaligned_and_odd_k():
    """A misaligned x (an offset view: no 16-byte loads) and per-channel int8 with K % 16 != 0."""
    x, qweight, scale, zero, b, bits, group = _make("int4-g32", 3, 45, 256, torch.float16, True)
    buf = torch.empty(x.numel() + 1, device=DEV, dtype=x.dtype)
    xm = buf[1:].view_as(x)
    xm.copy_(x)
    assert xm.data_ptr() % 16 != 0
    _check(xm, qweight, scale, zero, b, bits, group, what="misaligned x")
    _check(*_make("int8", 2, 45, 33, torch.bfloat16, True), what="int8 K=33")


def test_leading_dims_and_act_int8_ignored():
    x, qweight, scale, zero, b, bits, group = _make("int8-g32", 6, 37, 96, torch.float32, True)
    x3 = x.view(2, 3, 96)
    y = ops.quantized_linear(x3, qweight, scale, zero, b, bits=bits, group_size=group, backend="native")
    y2 = ops.quantized_linear(x3, qweight, scale, zero, b, bits=bits, group_size=group, act_int8=True,
                              backend="native")
    assert torch.equal(y, y2) and y.shape == (2, 3, 37)
    _check(x, qweight, scale, zero, b, bits, group, what="2-D")


def test_dispatch_on_cuda():
    """fp64 x is refused by native CUDA (auto falls back); fp32 / bf16 run natively when asked."""
    from gptfast.ops import native

    call = dict(bits=8, group_size=32, zero=False, act_int8=False)
    assert "float32, float16 and bfloat16" in native.unsupported("quantized_linear", device_type="cuda",
                                                                 dtype=torch.float64, **call)
    assert native.unsupported("quantized_linear", device_type="cuda", dtype=torch.bfloat16, **call) is None
    assert ops.resolve("quantized_linear", "cuda", "auto", dtype=torch.float64, **call) in ("torch", "reference")


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(bits=5), "bits must be 8 or 4"),
        (dict(group_size=48), "group_size must be 32, 64 or 128"),
        (dict(scale=lambda s: s.float()), "scale must be float16"),
        (dict(x=lambda x: x[:, :64]), "x must have K = 96"),
        (dict(bias=lambda b: b[:3]), "bias must have shape"),
        (dict(qweight=lambda q: q.cpu()), "qweight must be a CUDA tensor"),
    ],
)
def test_input_errors_name_the_argument(change, words):
    x, qweight, scale, zero, b, bits, group = _make("int8-g32", 2, 5, 96, torch.float32, True)
    args = dict(x=x, qweight=qweight, scale=scale, zero=zero, bias=b, bits=bits, group_size=group)
    for k, f in change.items():
        args[k] = f(args[k]) if callable(f) else f
    with pytest.raises(RuntimeError, match=words):
        torch.ops.gptfast.quantized_linear(args["x"], args["qweight"], args["scale"], args["zero"], args["bias"],
                                           args["bits"], args["group_size"], False)
