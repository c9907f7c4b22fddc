"""The Triton backend against the reference ops: forward and backward, ragged shapes, fp32/fp16.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton), so shapes stay small. bf16 and large shapes run only on a GPU
(`@pytest.mark.gpu`): the interpreter mis-computes `tl.dot` on two bf16 operands.

Tolerances: fp32 kernels accumulate in fp32 like the reference, so they must agree to ~1e-5
(summation order only). Half precision follows FlashAttention's rule: the kernel's error against
an fp32 reference must be at most 2x the error of plain PyTorch computing in the same dtype, plus
a small atol (`assert_error_within`).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from gptfast import ops
from gptfast.ops import reference
from tests.helpers import assert_close, assert_error_within

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# The interpreter evaluates GELU's sigmoid(2z) = 1 / (1 + exp(-2z)) in numpy, which warns when
# exp overflows for very negative z; the result (0) is the right limit.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_interpreter_is_active_without_cuda():
    """Without CUDA the kernels must be interpreted; a compiled JITFunction would fail on CPU."""
    if CUDA:
        pytest.skip("CUDA present: kernels are compiled, not interpreted")
    from triton.runtime.interpreter import InterpretedFunction

    from gptfast.kernels import layer_norm as ln

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(ln._layer_norm_fwd_kernel, InterpretedFunction), type(ln._layer_norm_fwd_kernel)
    assert ops.unavailable_reason("triton", "layer_norm", "cpu") is None


# ----------------------------------------------------------------------------- backend protocol


def test_availability_needs_cuda_or_interpreter(monkeypatch):
    from gptfast.ops import triton_ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_ops.availability("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    assert triton_ops.availability("cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_ops.availability("cpu") is None


def test_unsupported_calls_give_reasons():
    from gptfast.ops import triton_ops

    assert "head dims" in triton_ops.unsupported("causal_attention", dtype=torch.float32, head_dim=48, dropout_p=0.0)
    assert "dropout" in triton_ops.unsupported("causal_attention", dtype=torch.float16, head_dim=64, dropout_p=0.1)
    assert "fp16/bf16/fp32" in triton_ops.unsupported("layer_norm", dtype=torch.float64, n=8)
    assert "head dims" in triton_ops.unsupported("decode_attention", dtype=torch.float32, head_dim=8)
    assert triton_ops.unsupported("causal_attention", dtype=torch.bfloat16, head_dim=128, dropout_p=0.0) is None
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ops.BackendUnavailableError, match="head dims"):
        ops.causal_attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ops.BackendUnavailableError, match="dropout"):
        ops.causal_attention(q, q, q, dropout_p=0.1, backend="triton")
    # The kernel entry points check their inputs themselves too (they are importable on their own).
    from gptfast.kernels.attention import causal_attention as triton_attention

    q48 = torch.randn(1, 1, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dim D must be one of"):
        triton_attention(q48, q48, q48)


def test_auto_uses_triton_on_cuda_only(monkeypatch):
    """The CPU interpreter is for tests: `auto` must not route CPU tensors through it."""
    # Stub the native backend out (its first use JIT-builds C++): auto must then fall to torch.
    monkeypatch.setitem(ops._module_cache, "native", "stubbed out by this test")
    assert ops.resolve("layer_norm", "cpu", dtype=torch.float32, n=8) == "torch"
    assert ops.resolve("layer_norm", "cpu", backend="triton", dtype=torch.float32, n=8) == "triton"
    if CUDA:
        assert ops.resolve("layer_norm", "cuda", dtype=torch.float16, n=768) == "triton"


# ----------------------------------------------------------------------------- helpers


def _randn(*shape, dtype, gen, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(grad)


def _fwd_bwd(fn, inputs, grad_out=None):
    """(output, grads of sum(output * grad_out) w.r.t. inputs), grad_out drawn if not given."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)
    return out, grads, grad_out


def _fp32_copies(inputs):
    return [None if t is None else t.detach().float().requires_grad_() for t in inputs]


def _check_all(name, ours, ref32, baseline=None, atol=1e-5, rtol=1e-5):
    """fp32: assert_close against the fp32 reference. Half: FlashAttention's 2x-of-PyTorch rule."""
    for i, (a, e) in enumerate(zip(ours, ref32)):
        what = f"{name}[{i}]"
        if baseline is None:
            assert_close(a, e, atol=atol, rtol=rtol, what=what)
        else:
            assert_error_within(a, e, baseline[i], factor=2.0, atol=atol, what=what)


def _naive_attention(q, k, v, scale=None, key_mask=None):
    """Standard attention computed entirely in q's dtype: FlashAttention's low-precision baseline.
    key_mask (..., Tq, Tk) True = attend; defaults to causal."""
    T = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale
    if key_mask is None:
        key_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~key_mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v


# ----------------------------------------------------------------------------- causal attention

# fp16 atol: a few fp16 ulps at |x| ~ 1 (2^-10 ~ 1e-3) for the ties where PyTorch's own error is 0.
ATTN_CASES = [
    (1, 16, torch.float32, 1e-5),
    (17, 32, torch.float32, 1e-5),
    (65, 64, torch.float32, 1e-5),
    (17, 16, torch.float16, 1e-3),
    (65, 32, torch.float16, 1e-3),
]


@pytest.mark.parametrize("T,D,dtype,atol", ATTN_CASES)
def test_causal_attention_matches_reference(T, D, dtype, atol):
    g = torch.Generator().manual_seed(T * 100 + D)
    B, H = 1, 2
    q, k, v = (_randn(B, H, T, D, dtype=dtype, gen=g) for _ in range(3))
    out, grads, go = _fwd_bwd(lambda *a: ops.causal_attention(*a, backend="triton"), [q, k, v])
    ins32 = _fp32_copies([q, k, v])
    ref, ref_grads, _ = _fwd_bwd(reference.causal_attention, ins32, go.float())
    baseline = None
    if dtype != torch.float32:
        ins16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        b_out, b_grads, _ = _fwd_bwd(_naive_attention, ins16, go)
        baseline = [b_out, *b_grads]
    _check_all(f"attention T={T} D={D} {dtype}", [out, *grads], [ref, *ref_grads], baseline, atol=atol)


def test_causal_attention_strided_inputs_and_scale():
    """q/k/v as GPT-2 makes them: views of one (B, T, 3, H, D) tensor, transposed; custom scale."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 33, 2, 16
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), non-contiguous
    out = ops.causal_attention(q, k, v, scale=0.3, backend="triton")
    (g_ours,) = torch.autograd.grad(out.square().sum(), qkv)
    qkv32 = qkv.detach().clone().requires_grad_()
    q, k, v = (qkv32[:, :, i].transpose(1, 2) for i in range(3))
    ref = reference.causal_attention(q, k, v, scale=0.3)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qkv32)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, what="strided attention out")
    assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5, what="strided attention grad")


# ----------------------------------------------------------------------------- layer norm

LN_CASES = [
    (3, 80, torch.float32, True),
    (2, 768, torch.float32, True),
    (5, 333, torch.float32, False),  # non-power-of-two N, no affine parameters
    (3, 80, torch.float16, True),
    (4, 333, torch.float16, True),
]


@pytest.mark.parametrize("M,N,dtype,affine", LN_CASES)
def test_layer_norm_matches_reference(M, N, dtype, affine):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = _randn(M, N, dtype=dtype, gen=g, scale=2.0)
    w = _randn(N, dtype=dtype, gen=g) if affine else None
    b = _randn(N, dtype=dtype, gen=g) if affine else None
    out, grads, go = _fwd_bwd(lambda *a: ops.layer_norm(*a, backend="triton"), [x, w, b])
    ref, ref_grads, _ = _fwd_bwd(reference.layer_norm, _fp32_copies([x, w, b]), go.float())
    baseline = None
    if dtype != torch.float32:
        ins = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
        b_out, b_grads, _ = _fwd_bwd(lambda x_, w_, b_: torch.nn.functional.layer_norm(x_, (N,), w_, b_), ins, go)
        baseline = [b_out, *b_grads]
    # fp32 atol 1e-5: dW sums M rows of O(1) products, reordered.
    _check_all(f"layer_norm M={M} N={N} {dtype}", [out, *grads], [ref, *ref_grads], baseline, atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_layer_norm_3d_input_many_rows_per_program():
    """(B, T, N) input and more rows than backward programs: the partial dW/dB reduction adds up."""
    g = torch.Generator().manual_seed(11)
    x = _randn(3, 7, 48, dtype=torch.float32, gen=g)
    w, b = _randn(48, dtype=torch.float32, gen=g), _randn(48, dtype=torch.float32, gen=g)
    out, grads, go = _fwd_bwd(lambda *a: ops.layer_norm(*a, backend="triton"), [x, w, b])
    ref, ref_grads, _ = _fwd_bwd(reference.layer_norm, _fp32_copies([x, w, b]), go)
    _check_all("layer_norm 3-D", [out, *grads], [ref, *ref_grads])


# ----------------------------------------------------------------------------- GELU MLP

MLP_CASES = [
    ((17,), 48, 80, torch.float32, True),
    ((2, 5), 48, 80, torch.float32, False),
    ((17,), 48, 80, torch.float16, True),
]


@pytest.mark.parametrize("lead,C,F,dtype,bias", MLP_CASES)
def test_gelu_mlp_matches_reference(lead, C, F, dtype, bias):
    g = torch.Generator().manual_seed(C + F)
    x = _randn(*lead, C, dtype=dtype, gen=g)
    w_fc = _randn(F, C, dtype=dtype, gen=g, scale=C ** -0.5)
    w_proj = _randn(C, F, dtype=dtype, gen=g, scale=F ** -0.5)
    b_fc = _randn(F, dtype=dtype, gen=g) if bias else None
    b_proj = _randn(C, dtype=dtype, gen=g) if bias else None
    ins = [x, w_fc, b_fc, w_proj, b_proj]
    out, grads, go = _fwd_bwd(lambda *a: ops.gelu_mlp(*a, backend="triton"), ins)
    ref, ref_grads, _ = _fwd_bwd(reference.gelu_mlp, _fp32_copies(ins), go.float())
    baseline = None
    if dtype != torch.float32:
        b_out, b_grads, _ = _fwd_bwd(
            reference.gelu_mlp, [None if t is None else t.detach().clone().requires_grad_() for t in ins], go
        )
        baseline = [b_out, *b_grads]
    _check_all(f"gelu_mlp {lead} {C}->{F} {dtype}", [out, *grads], [ref, *ref_grads], baseline,
               atol=2e-5 if dtype == torch.float32 else 1e-3)


# ----------------------------------------------------------------------------- decode attention


def _decode_inputs(B, H, Tq, T_max, D, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, H, T_max, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, H, T_max, D, generator=g).to(DEVICE, dtype)
    lens = torch.tensor(lens, device=DEVICE)
    for b in range(B):  # poison the unused tail: a kernel that reads it returns NaN/inf
        k[b, :, int(lens[b]):] = float("nan")
        v[b, :, int(lens[b]):] = float("inf")
    return q, k, v, lens


# Lengths end mid-tile (the interpreter's tile is 16 positions), at Tq (only new tokens), at T_max.
DECODE_CASES = [
    (1, 16, [1, 23, 70], torch.float32),
    (2, 32, [2, 45, 70], torch.float32),
    (3, 64, [3, 17, 66], torch.float32),
    (1, 32, [9, 70, 33], torch.float16),
    (3, 16, [3, 41, 70], torch.float16),
]


@pytest.mark.parametrize("Tq,D,lens,dtype", DECODE_CASES)
def test_decode_attention_matches_reference(Tq, D, lens, dtype):
    B, H, T_max = len(lens), 2, 70
    q, k, v, cache_lens = _decode_inputs(B, H, Tq, T_max, D, lens, dtype, seed=Tq * 10 + D)
    out = ops.decode_attention(q, k, v, cache_lens.to(torch.int32), backend="triton")
    assert torch.isfinite(out).all(), "decode attention read past a cache length"
    ref = reference.decode_attention(q.float(), k.float(), v.float(), cache_lens)
    if dtype == torch.float32:
        assert_close(out, ref, atol=1e-5, rtol=1e-5, what=f"decode Tq={Tq} D={D}")
    else:
        # PyTorch in fp16: naive masked attention over each row's valid prefix.
        base = torch.empty_like(out)
        for b in range(B):
            L = int(cache_lens[b])
            qpos = torch.arange(L - Tq, L, device=DEVICE).view(Tq, 1)
            mask = torch.arange(L, device=DEVICE).view(1, L) <= qpos
            base[b] = _naive_attention(q[b], k[b, :, :L], v[b, :, :L], key_mask=mask)
        assert_error_within(out, ref, base, atol=1e-3, what=f"decode Tq={Tq} D={D} fp16")


def test_decode_attention_matches_causal_attention_rows():
    """Independent check: decoding the last Tq tokens = the last Tq rows of full causal attention."""
    g = torch.Generator().manual_seed(5)
    B, H, T, D, Tq = 1, 2, 37, 32, 2
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(3))
    lens = torch.tensor([T], device=DEVICE)
    out = ops.decode_attention(q[:, :, -Tq:], k, v, lens, backend="triton")
    full = reference.causal_attention(q, k, v)
    assert_close(out, full[:, :, -Tq:], atol=1e-5, rtol=1e-5, what="decode vs causal rows")


# ----------------------------------------------------------------------------- sampling

SAMPLE_CASES = [
    (1.0, None, None),
    (0.7, 5, None),
    (1.3, None, 0.8),
    (1.0, 7, 0.6),
    (1.0, 1, None),       # top-1: always the argmax
    (1.0, None, 1.0),     # top_p = 1: no filter
]


def _tie_logits(B, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2.0
    logits[0, :12] = 1.5          # a block of exact ties
    logits[1, 5] = float("-inf")  # a banned token
    return logits.to(DEVICE)


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLE_CASES)
def test_sample_token_for_token(temperature, top_k, top_p):
    logits = _tie_logits(6, 50, seed=int(temperature * 10) + (top_k or 0))
    g1 = torch.Generator(device=DEVICE).manual_seed(1234)
    g2 = torch.Generator(device=DEVICE).manual_seed(1234)
    got = ops.sample(logits, temperature, top_k, top_p, g1, backend="triton")
    want = reference.sample(logits, temperature, top_k, top_p, g2)
    assert got.dtype == torch.int64 and got.shape == (6,)
    assert torch.equal(got, want), f"triton {got.tolist()} != reference {want.tolist()}"
    # Both consumed exactly one uniform per row: the generators are in the same state.
    assert torch.equal(torch.rand(3, generator=g1, device=DEVICE), torch.rand(3, generator=g2, device=DEVICE))


def test_sample_fp16_logits_and_greedy():
    logits = _tie_logits(4, 50, seed=9).half()
    g1 = torch.Generator(device=DEVICE).manual_seed(5)
    g2 = torch.Generator(device=DEVICE).manual_seed(5)
    assert torch.equal(ops.sample(logits, 0.9, 10, 0.9, g1, backend="triton"),
                       reference.sample(logits, 0.9, 10, 0.9, g2))
    assert torch.equal(ops.sample(logits, 0.0, backend="triton"), logits.argmax(-1))


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; cells with expected count < 5 are pooled."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(exp) - 1
    # Survival function of chi-square via the regularised upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


# Interpreter draws cost ~0.15 s each with filters: modest counts here, 20000 in the GPU test below.
@pytest.mark.parametrize("top_k,top_p,draws", [(None, None, 300), (12, 0.9, 100)])
def test_sample_distribution_chi_square(top_k, top_p, draws):
    """Many draws of one row: frequencies match the filtered softmax; filtered tokens never appear."""
    V = 50
    g = torch.Generator().manual_seed(21)
    row = torch.randn(V, generator=g) * 1.5
    logits = row.expand(draws, V).contiguous().to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(99)
    tokens = ops.sample(logits, 1.0, top_k, top_p, gen, backend="triton").cpu()
    probs = reference.sampling_filter(row.view(1, V), 1.0, top_k, top_p)[0]
    assert (probs[tokens] > 0).all(), f"drew filtered-out tokens {tokens[probs[tokens] == 0].unique().tolist()}"
    counts = torch.bincount(tokens, minlength=V)
    p = _chi_square_p(counts, probs)
    assert p > 1e-3, f"chi-square p-value {p:.2e}: counts {counts.tolist()} vs probs {probs.tolist()}"


@pytest.mark.gpu  # ~0.15 s per draw in the interpreter: this many draws only on a GPU
def test_gpu_sample_distribution_chi_square_many_draws():
    V, draws = 50, 20000
    g = torch.Generator().manual_seed(22)
    row = torch.randn(V, generator=g)
    logits = row.expand(draws, V).contiguous().to(DEVICE)
    tokens = ops.sample(logits, 0.8, 20, 0.95, torch.Generator(device=DEVICE).manual_seed(3), backend="triton").cpu()
    probs = reference.sampling_filter(row.view(1, V), 0.8, 20, 0.95)[0]
    assert (probs[tokens] > 0).all()
    assert _chi_square_p(torch.bincount(tokens, minlength=V), probs) > 1e-3


# ----------------------------------------------------------------------------- custom-op registration


# On CPU the AOT-dispatch check runs the kernel on functional tensors, which Triton's interpreter
# cannot read ("invalid python storage"); that check runs where the kernels are compiled (GPU).
_OPCHECK_UTILS = None if CUDA else ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck_cases():
    import gptfast.kernels.attention, gptfast.kernels.decode_attention, gptfast.kernels.gelu_mlp, gptfast.kernels.layer_norm, gptfast.kernels.sampling  # noqa: F401,E401  (registers the ops)

    x = torch.randn(3, 40, device=DEVICE)
    w, b = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    q, k, v, lens = _decode_inputs(2, 1, 1, 20, 16, [5, 20], torch.float32, seed=0)
    k, v = k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0)
    qa = torch.randn(1, 2, 17, 16, device=DEVICE)
    logits = torch.randn(3, 30, device=DEVICE)
    return [
        (torch.ops.gptfast_triton.layer_norm_fwd.default, (x, w, b, 1e-5)),
        (torch.ops.gptfast_triton.decode_attention.default, (q, k, v, lens, 0.25)),
        (torch.ops.gptfast_triton.attention_fwd.default, (qa, qa, qa, 0.25)),
        (torch.ops.gptfast_triton.gelu_mlp_fwd.default,
         (x[:, :16].contiguous(), torch.randn(24, 16, device=DEVICE), torch.randn(24, device=DEVICE),
          torch.randn(5, 24, device=DEVICE), None)),
        (torch.ops.gptfast_triton.sample_from_uniform.default, (logits, torch.rand(3, device=DEVICE), 1.0, 5, 0.9)),
    ]


def test_opcheck_custom_ops():
    """torch.library.opcheck: schemas, fake kernels (used by torch.compile) and dispatch agree."""
    for op, args in _opcheck_cases():
        if _OPCHECK_UTILS is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=_OPCHECK_UTILS)


# ----------------------------------------------------------------------------- GPU only: bf16, big shapes


def _gpu_attention_case(T, D, dtype):
    g = torch.Generator().manual_seed(T + D)
    B, H = 2, 4
    q, k, v = (_randn(B, H, T, D, dtype=dtype, gen=g) for _ in range(3))
    out, grads, go = _fwd_bwd(lambda *a: ops.causal_attention(*a, backend="triton"), [q, k, v])
    ref, ref_grads, _ = _fwd_bwd(reference.causal_attention, _fp32_copies([q, k, v]), go.float())
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b_out, b_grads, _ = _fwd_bwd(_naive_attention, ins, go)
    _check_all(f"attention T={T} D={D} {dtype}", [out, *grads], [ref, *ref_grads], [b_out, *b_grads], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,D", [(1, 64), (97, 16), (341, 32), (1023, 64), (1024, 128), (1025, 128)])
def test_gpu_causal_attention_low_precision(T, D, dtype):
    _gpu_attention_case(T, D, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D", [(257, 128), (1024, 64)])
def test_gpu_causal_attention_fp32(T, D):
    g = torch.Generator().manual_seed(T)
    q, k, v = (_randn(1, 2, T, D, dtype=torch.float32, gen=g) for _ in range(3))
    out, grads, go = _fwd_bwd(lambda *a: ops.causal_attention(*a, backend="triton"), [q, k, v])
    ref, ref_grads, _ = _fwd_bwd(reference.causal_attention, _fp32_copies([q, k, v]), go)
    # Reference matmuls on GPU may use TF32 unless disabled; compare in fp64 instead.
    ref64, ref64_grads, _ = _fwd_bwd(reference.causal_attention, [t.detach().double().requires_grad_() for t in (q, k, v)], go.double())
    _check_all("attention fp32 GPU", [out, *grads], [ref64, *ref64_grads], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(4097, 768), (64, 8192), (33, 1000)])
def test_gpu_layer_norm_low_precision(M, N, dtype):
    g = torch.Generator().manual_seed(N)
    x, w, b = _randn(M, N, dtype=dtype, gen=g), _randn(N, dtype=dtype, gen=g), _randn(N, dtype=dtype, gen=g)
    out, grads, go = _fwd_bwd(lambda *a: ops.layer_norm(*a, backend="triton"), [x, w, b])
    ref, ref_grads, _ = _fwd_bwd(reference.layer_norm, _fp32_copies([x, w, b]), go.float())
    ins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    b_out, b_grads, _ = _fwd_bwd(lambda x_, w_, b_: torch.nn.functional.layer_norm(x_, (N,), w_, b_), ins, go)
    _check_all(f"layer_norm {M}x{N} {dtype}", [out, *grads], [ref, *ref_grads], [b_out, *b_grads], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,C,F", [(1000, 768, 3072), (17, 48, 80), (2048, 1024, 4096)])
def test_gpu_gelu_mlp_low_precision(M, C, F, dtype):
    g = torch.Generator().manual_seed(M)
    x = _randn(M, C, dtype=dtype, gen=g)
    ins = [x, _randn(F, C, dtype=dtype, gen=g, scale=C ** -0.5), _randn(F, dtype=dtype, gen=g),
           _randn(C, F, dtype=dtype, gen=g, scale=F ** -0.5), _randn(C, dtype=dtype, gen=g)]
    out, grads, go = _fwd_bwd(lambda *a: ops.gelu_mlp(*a, backend="triton"), ins)
    ref, ref_grads, _ = _fwd_bwd(reference.gelu_mlp, _fp32_copies(ins), go.float())
    b_out, b_grads, _ = _fwd_bwd(reference.gelu_mlp, [t.detach().clone().requires_grad_() for t in ins], go)
    _check_all(f"gelu_mlp {M}x{C}x{F} {dtype}", [out, *grads], [ref, *ref_grads], [b_out, *b_grads], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq,D", [(1, 64), (4, 128), (3, 32)])
def test_gpu_decode_attention_low_precision(Tq, D, dtype):
    B, H, T_max = 4, 12, 2048
    lens = [Tq, 1000, 2048, 1537]
    q, k, v, cache_lens = _decode_inputs(B, H, Tq, T_max, D, lens, dtype, seed=D)
    out = ops.decode_attention(q, k, v, cache_lens, backend="triton")
    ref = reference.decode_attention(q.float(), k.float(), v.float(), cache_lens)
    base = torch.empty_like(out)
    for b in range(B):
        L = int(cache_lens[b])
        qpos = torch.arange(L - Tq, L, device=DEVICE).view(Tq, 1)
        mask = torch.arange(L, device=DEVICE).view(1, L) <= qpos
        base[b] = _naive_attention(q[b], k[b, :, :L], v[b, :, :L], key_mask=mask)
    assert_error_within(out, ref, base, atol=1e-3, what=f"decode GPU Tq={Tq} D={D} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 50, 0.95), (1.0, 200, None), (1.2, None, 0.5)])
def test_gpu_sample_gpt2_vocab_token_for_token(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 50257, generator=g) * 3).to(DEVICE)
    g1 = torch.Generator(device=DEVICE).manual_seed(7)
    g2 = torch.Generator(device=DEVICE).manual_seed(7)
    got = ops.sample(logits, temperature, top_k, top_p, g1, backend="triton")
    want = reference.sample(logits, temperature, top_k, top_p, g2)
    # Boundary rounding may flip a rare row; more than one of 16 is a bug.
    assert (got != want).sum().item() <= 1, f"{got.tolist()} vs {want.tolist()}"
