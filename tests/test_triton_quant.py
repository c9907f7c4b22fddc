"""The Triton quantized linear (kernels/quant_linear.py, issue #20) against the fp64 truth.

Truth: x (fp64) @ the dequantized weight (fp64, `quant.dequantize_weight`) + bias. Tolerance: the
project's rule (gptfast.testing.assert_error_within): at most 2x the error of the `reference`
backend (plain PyTorch: dequantize to x's dtype, then x w^T + b) in the same dtype, plus two output
roundings. On CPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes stay small;
the interpreter mis-computes tl.dot on two bf16 operands, so bf16 runs on CPU only through the GEMV
path (M <= GEMV_MAX_M: no tl.dot) and on a GPU for both (`-m gpu`).

Shapes: odd N (1, 37), K not a multiple of the kernel's BLOCK_K (96, 192, 33 for per-channel
int8), M on both sides of the GEMV / GEMM switch, leading batch dims, every format of the contract.
"""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.ops import quant
from tests.helpers import assert_error_within

import triton  # noqa: E402,F401  (the test extra installs it: a missing Triton fails here, it is not a skip)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (bits, group_size, zero_point): every format of gptfast.quantize (the lead's contract) + int8-g64/g128.
FORMATS = {
    "int8": (8, None, False),
    "int8-g32": (8, 32, False),
    "int8-g64": (8, 64, False),
    "int8-g128": (8, 128, False),
    "int4-g32": (4, 32, False),
    "int4-g64": (4, 64, False),
    "int4-g128": (4, 128, False),
    "int4-g32-zp": (4, 32, True),
    "int4-g64-zp": (4, 64, True),
    "int4-g128-zp": (4, 128, True),
}


def _k_for(bits: int, group: int | None, small: bool = True) -> int:
    """A K that is legal for the format and not a multiple of the kernel's BLOCK_K (128)."""
    if group is None:
        return 33  # per-channel int8: any K
    return {32: 96, 64: 192, 128: 384}[group] if small else 3 * 256


def _make(fmt: str, lead: tuple[int, ...], N: int, K: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    bits, group, zp = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    if zp:
        w = w + 0.3 * torch.rand(N, 1, generator=g)  # asymmetric rows: the zero point matters
    qweight, scale, zero = quant.quantize_weight(w, bits, group, zp)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(qweight), to(scale), to(zero), to(b), bits, group


def _truth(x, qweight, scale, zero, b, bits, group):
    w = quant.dequantize_weight(qweight, scale, zero, bits, group, torch.float64)
    y = x.double() @ w.t()
    return y if b is None else y + b.double()


def _check(fmt, lead, N, K, dtype, bias, backend="triton", seed=0):
    x, qweight, scale, zero, b, bits, group = _make(fmt, lead, N, K, dtype, bias, seed)
    y = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend=backend)
    assert y.dtype == dtype and tuple(y.shape) == (*lead, N)
    base = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="reference")
    assert_error_within(y, _truth(x, qweight, scale, zero, b, bits, group), base,
                        what=f"{backend} {fmt} lead{lead} N{N} K{K} {dtype}")


# ----------------------------------------------------------------------------- every format, both paths

# Each format: a GEMV call (M = 1, fp32, bias) and a GEMM call (M = 5 in a (5, ...) batch, fp16,
# no bias, odd N); the dtype / M / N / bias sweep is spread across formats below to keep the
# interpreter run short.
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gemv_fp32(fmt):
    bits, group, _ = FORMATS[fmt]
    _check(fmt, (1,), 37, _k_for(bits, group), torch.float32, bias=True)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gemm_fp16(fmt):
    bits, group, _ = FORMATS[fmt]
    _check(fmt, (5,), 19, _k_for(bits, group), torch.float16, bias=False)


@pytest.mark.parametrize(
    "fmt,lead,N,dtype,bias",
    [
        ("int8", (2, 2), 1, torch.float32, True),          # GEMV, 4 rows in a batch, one output
        ("int8-g32", (3,), 37, torch.bfloat16, True),      # bf16 through the GEMV (no tl.dot)
        ("int4-g32", (4,), 37, torch.bfloat16, False),
        ("int4-g64-zp", (2,), 37, torch.float16, True),
        ("int8", (17,), 37, torch.float32, True),          # GEMM: a second m tile (BLOCK_M 32)
        ("int4-g32", (33,), 37, torch.float16, True),      # BLOCK_M 64
        ("int4-g128-zp", (2, 9), 37, torch.float32, False),
    ],
)
def test_rows_dtypes_bias(fmt, lead, N, dtype, bias):
    bits, group, _ = FORMATS[fmt]
    _check(fmt, lead, N, _k_for(bits, group), dtype, bias)


def test_several_k_chunks_and_n_tiles():
    """K spanning several BLOCK_K chunks and N several BLOCK_N tiles, on both paths."""
    _check("int4-g32-zp", (1,), 70, 320, torch.float32, bias=True)
    _check("int8-g32", (6,), 70, 320, torch.float32, bias=False)


def _every_gpu_config_cases():
    from gptfast.kernels import quant_linear as ql

    fmts = ["int8", "int8-g32", "int4-g32", "int4-g64-zp", "int8-g128", "int4-g128-zp"]
    cases = []
    for path, cfgs, M in (("gemv", ql.GEMV_CONFIGS, 3), ("gemm", ql.GEMM_CONFIGS, 20)):
        for i in range(len(cfgs)):
            # a rotating format, and a 32-group one: the most groups per chunk at every BLOCK_K
            for fmt in dict.fromkeys([fmts[i % len(fmts)], ("int8-g32", "int4-g32")[i % 2]]):
                cases.append(pytest.param(path, i, fmt, M, id=f"{path}{i}-{fmt}"))
    return cases


@pytest.mark.parametrize("path,i,fmt,M", _every_gpu_config_cases())
def test_every_gpu_config_tiling_in_the_interpreter(path, i, fmt, M):
    """The interpreter runs one small config per kernel; a GPU autotunes over GEMV_CONFIGS /
    GEMM_CONFIGS (BLOCK_N 8..128, BLOCK_K 128..512: up to 16 groups per chunk). Each GPU config's
    tiling, run here explicitly, on N and K that leave partial tiles and chunks."""
    from gptfast.kernels import quant_linear as ql

    bits, group, _ = FORMATS[fmt]
    cfg = (ql.GEMV_CONFIGS if path == "gemv" else ql.GEMM_CONFIGS)[i]
    K = 200 if group is None else 640
    x, qweight, scale, zero, b, bits, group = _make(fmt, (M,), 70, K, torch.float32, True, seed=i)
    y = torch.empty(M, 70, device=DEVICE)
    ql._launch(x, qweight, scale, zero, b, y, bits, group or 0, config=cfg)
    base = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="reference")
    assert_error_within(y, _truth(x, qweight, scale, zero, b, bits, group), base, what=f"{path} config {cfg}")


def test_strided_x_and_zero_rows():
    """x whose rows are not contiguous in memory; M = 0 returns an empty (0, N) result."""
    x, qweight, scale, zero, b, bits, group = _make("int8-g32", (3,), 37, 96, torch.float32, True)
    wide = torch.randn(3, 2 * 96, device=DEVICE)
    wide[:, ::2] = x  # x as a strided view: row stride 192, element stride 2
    xs = wide[:, ::2]
    y = ops.quantized_linear(xs, qweight, scale, zero, b, bits=bits, group_size=group, backend="triton")
    base = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="reference")
    assert_error_within(y, _truth(x, qweight, scale, zero, b, bits, group), base, what="strided x")
    y0 = ops.quantized_linear(x[:0], qweight, scale, zero, b, bits=bits, group_size=group, backend="triton")
    assert tuple(y0.shape) == (0, 37)


def test_zero_scale_group_and_extreme_codes():
    """Codes at both ends (int8 -127 / 127, int4 nibbles 0 and 15) and a group whose scale is 0."""
    N, K = 3, 64
    w = torch.randn(N, K)
    w[0, :32] = 0.0  # an all-zero group: scale 0, q 0
    w[1, 5], w[1, 6] = -4.0, 4.0  # the row's extremes dominate their group
    for fmt in ("int8-g32", "int4-g32", "int4-g32-zp"):
        bits, group, zp = FORMATS[fmt]
        qweight, scale, zero = (None if t is None else t.to(DEVICE) for t in quant.quantize_weight(w, bits, group, zp))
        assert float(scale[0, 0]) == 0.0
        x = torch.randn(2, K, device=DEVICE)
        y = ops.quantized_linear(x, qweight, scale, zero, bits=bits, group_size=group, backend="triton")
        base = ops.quantized_linear(x, qweight, scale, zero, bits=bits, group_size=group, backend="reference")
        assert_error_within(y, _truth(x, qweight, scale, zero, None, bits, group), base, what=fmt)


@pytest.mark.parametrize("fmt", ["int8-g32", "int4-g32-zp"])
def test_quantized_model_forward_on_triton(fmt):
    """A small GPT quantized with gptfast.quantize (every linear and the tied head, N = 65 odd) run
    with backend='triton' (every op a Triton kernel, the quantized linears included) vs the fp64
    truth: the fp32 model on the dequantized weights, in fp64; baseline: that model in fp32."""
    import copy

    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    from gptfast.quantize import QuantLinear, quantize

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.0, n_embd=128, n_head=4, block_size=24),
                backend="reference").eval()
    q = quantize(copy.deepcopy(model), fmt)
    d = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QuantLinear):
                d.get_submodule(name).weight.copy_(m.dequantized_weight())
        q, d = q.to(DEVICE), d.to(DEVICE)
        idx = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        truth = copy.deepcopy(d).double()(idx)[0]
        baseline = d(idx)[0]
        q.backend = "triton"
        assert_error_within(q(idx)[0], truth, baseline, what=f"quantized GPT {fmt} on triton")


# ----------------------------------------------------------------------------- backend protocol


def test_dispatch_rules():
    """Triton runs quantized_linear on CPU only by explicit request (interpreter); fp64 is refused
    with the reason; auto never picks Triton on CPU."""
    from gptfast.ops import triton_ops

    assert "fp16/bf16/fp32" in triton_ops.unsupported("quantized_linear", dtype=torch.float64, bits=8,
                                                      group_size=None, zero=False, act_int8=False)
    assert triton_ops.unsupported("quantized_linear", dtype=torch.bfloat16, bits=4, group_size=128, zero=True,
                                  act_int8=False) is None
    if not CUDA:
        assert ops.resolve("quantized_linear", "cpu", "auto", dtype=torch.float32, bits=8, group_size=None,
                           zero=False, act_int8=False) != "triton"
        assert ops.resolve("quantized_linear", "cpu", "triton", dtype=torch.float32, bits=8, group_size=None,
                           zero=False, act_int8=False) == "triton"
    x, qweight, scale, zero, b, bits, group = _make("int8", (2,), 5, 33, torch.float32, True)
    with pytest.raises(ops.BackendUnavailableError, match="fp16/bf16/fp32"):
        ops.quantized_linear(x.double(), qweight, scale, bias=b.double(), bits=8, group_size=None, backend="triton")


def test_opcheck_custom_op():
    """torch.library.opcheck of gptfast_triton::quantized_linear (schema, fake kernel for
    torch.compile, dispatch), both paths, with and without zero / bias."""
    import gptfast.kernels.quant_linear  # noqa: F401  (registers the op)

    utils = None if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")
    for fmt, M, bias in (("int8", 2, True), ("int4-g32-zp", 5, False)):
        x, qweight, scale, zero, b, bits, group = _make(fmt, (M,), 7, 64, torch.float32, bias)
        args = (x, qweight, scale, zero, b, bits, group or 0)
        if utils is None:
            torch.library.opcheck(torch.ops.gptfast_triton.quantized_linear.default, args)
        else:
            torch.library.opcheck(torch.ops.gptfast_triton.quantized_linear.default, args, test_utils=utils)


def test_act_int8_is_ignored_weight_only():
    """act_int8 (the native CPU option) does not change the Triton result: weight-only math."""
    x, qweight, scale, zero, b, bits, group = _make("int8-g32", (2,), 37, 96, torch.float32, True)
    a = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, backend="triton")
    c = ops.quantized_linear(x, qweight, scale, zero, b, bits=bits, group_size=group, act_int8=True,
                             backend="triton")
    assert torch.equal(a, c)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(x=lambda x: x.double()), TypeError, "x dtype"),
        (dict(bits=lambda _: 5), ValueError, "bits must be 4 or 8"),
        (dict(qweight=lambda q: q.view(torch.uint8)), TypeError, "qweight must be a 2-D torch.int8"),
        (dict(x=lambda x: x[:, :32]), ValueError, "x must have K = 96"),
        (dict(scale=lambda s: s[:, :2]), ValueError, "scale must be a float tensor of shape (5, 3)"),
        (dict(bias=lambda b: b[:4]), ValueError, "bias must be (5,)"),
        (dict(group_size=lambda _: 48), ValueError, "group_size must be None"),
        (dict(zero=lambda _: torch.zeros(5, 3, dtype=torch.float16, device=DEVICE)), ValueError,
         "zero is an int4 option"),
    ],
)
def test_kernel_entry_checks_its_inputs(change, exc, words):
    """The kernel module's public function validates on its own (it is importable directly)."""
    from gptfast.kernels.quant_linear import quantized_linear

    x, qweight, scale, zero, b, bits, group = _make("int8-g32", (2,), 5, 96, torch.float32, True)
    args = dict(x=x, qweight=qweight, scale=scale, zero=zero, bias=b, bits=bits, group_size=group)
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises(exc, match=__import__("re").escape(words)):
        quantized_linear(args.pop("x"), args.pop("qweight"), args.pop("scale"), args.pop("zero"), args.pop("bias"),
                         **args)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    """On CPU the kernels need the interpreter: without it the entry point says so (on any machine:
    the tensors are made on CPU here, with or without a GPU)."""
    from gptfast.kernels import _common
    from gptfast.kernels.quant_linear import quantized_linear

    monkeypatch.setattr(_common, "INTERPRET", False)
    x, qweight, scale, zero, b, bits, group = _make("int8", (1,), 5, 33, torch.float32, False)
    x, qweight, scale = x.cpu(), qweight.cpu(), scale.cpu()
    with pytest.raises(ValueError, match="CUDA device"):
        quantized_linear(x, qweight, scale, bits=8, group_size=None)


# ----------------------------------------------------------------------------- compiled for sm_80 / sm_90
#
# The interpreter checks the kernels' arithmetic, not that Triton can compile them: a construct the
# interpreter accepts (a reshape, a 1-row arange, a constexpr branch) may fail to lower for a GPU.
# Triton compiles ahead of time without a device (triton.compile with a GPUTarget: ttir -> ttgir ->
# llir -> ptx -> cubin through the wheel's ptxas), so CI compiles real specializations here, in a
# subprocess without TRITON_INTERPRET (conftest turned it on for this process).

_AOT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gptfast.kernels import quant_linear as ql

TY = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
out = []
for dtype, bits, group, zero, use_dot, block_m, gemm_cfg, arch in json.loads(sys.argv[1]):
    cfg = (ql.GEMM_CONFIGS if use_dot else ql.GEMV_CONFIGS)[gemm_cfg]
    sig = {"X": TY[dtype], "QW": "*i8" if bits == 8 else "*u8", "S": "*fp32" if group == 0 else "*fp16",
           "Z": "*fp16", "BIAS": TY[dtype], "Y": TY[dtype]}
    for a in ("M", "N", "K", "M_BUCKET", "stride_xm", "stride_qn", "stride_sn"):
        sig[a] = "i32"
    consts = dict(BITS=bits, GROUP=group, HAS_ZERO=zero, HAS_BIAS=True, USE_DOT=use_dot,
                  PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=block_m, **cfg.kwargs)
    sig.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=ql._quant_linear_kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    out.append(len(k.asm["cubin"]))
print(json.dumps(out))
"""


def _aot_compile(specs) -> list[int]:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT, json.dumps(specs)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, f"Triton could not compile the quantized linear kernel:\n{res.stderr[-6000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_compiles_for_sm80_and_sm90():
    """A GEMV and a GEMM specialization of each weight kind (int8 per channel, int8 groups, int4 with
    a zero point), bf16 / fp16 / fp32, to cubin for sm_80 and sm_90."""
    specs = [("bf16", 8, 0, False, False, 1, 0, 90), ("fp16", 4, 128, True, False, 4, 1, 80),
             ("fp32", 8, 32, False, True, 16, 0, 90), ("bf16", 4, 32, True, True, 64, 1, 80)]
    sizes = _aot_compile(specs)
    assert len(sizes) == len(specs) and all(n > 0 for n in sizes)


@pytest.mark.slow
def test_every_autotune_config_compiles():
    """Every GPU autotune config of both kernels x every format x every dtype (sm_90), plus sm_80."""
    from gptfast.kernels import quant_linear as ql

    fmts = [(8, 0, False), (8, 32, False), (8, 128, False), (4, 32, False), (4, 64, True), (4, 128, True)]
    specs = []
    for use_dot, cfgs in ((False, ql.GEMV_CONFIGS), (True, ql.GEMM_CONFIGS)):
        for i in range(len(cfgs)):
            for j, (bits, group, zero) in enumerate(fmts):
                dtype = ("fp32", "fp16", "bf16")[(i + j) % 3]
                block_m = (16, 32, 64)[j % 3] if use_dot else (1, 2, 4)[j % 3]
                specs.append((dtype, bits, group, zero, use_dot, block_m, i, 90 if j % 2 else 80))
    assert len(_aot_compile(specs)) == len(specs)


# ----------------------------------------------------------------------------- GPU benchmark script


def test_gpu_benchmark_case_runs_in_smoke_mode(tmp_path):
    """`python -m gptfast.bench.triton_gpu --ops quantized_linear` (what a lent GPU runs) in its CPU
    smoke mode: every format through the Triton kernel (GEMV and GEMM), checked vs fp64 before
    timing, GB/s from cases.quantized_linear_bytes, % of the read bandwidth measured in the run."""
    import json

    from gptfast.bench import cases, triton_gpu

    out = tmp_path / "q.json"
    assert triton_gpu.main(["--smoke", "--ops", "quantized_linear", "--providers", "triton", "reference",
                            "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    peak = doc["meta"]["read_bandwidth"]["gbps"]
    rows = [r for r in doc["results"] if r["op"].startswith("quantized_linear") and r["provider"] == "triton"]
    assert {(r["op"].split()[1], r["shape"][0]) for r in rows} == {(f, M) for f in triton_gpu.QUANT_FORMATS
                                                                    for M in (1, 5)}
    for r in rows:
        assert r["accuracy"] == "ok", r
        bits, g, zp = triton_gpu.QUANT_FORMATS[r["op"].split()[1]]
        M, N, K = r["shape"]
        want = cases.quantized_linear_bytes(M, N, K, bits, g, zp, 2) / (r["ms_median"] * 1e-3) / 1e9
        assert r["rate"] == pytest.approx(want)
        assert r["pct_of_read_bandwidth"] == pytest.approx(100 * want / peak)
    assert cases.quantized_linear_bytes(1, 4096, 4096, 4, 32, True, 2) == 4096 * 4096 / 2 + 4096 * 128 * 4 + 2 * 4096 * 2


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128-zp"])
@pytest.mark.parametrize("M", [1, 3, 16, 64, 300])
def test_gpu_gpt2_shapes(fmt, M, dtype):
    """GPT-2 small's linear shapes (768 -> 2304 / 3072, 3072 -> 768) on the compiled kernels."""
    for N, K in ((2304, 768), (768, 3072)):
        _check(fmt, (M,), N, K, dtype, bias=True)
