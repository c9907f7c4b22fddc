"""The one table of benchmark cases, shared by `gptfast bench` and `benchmarks/` (pytest-benchmark).

A `Case` names a dispatch op (`gptfast.ops.<op>`), a mode (`fwd` or `fwd+bwd`), a shape, a function
that builds the inputs, and the work formula the throughput column is computed from (FLOPs or bytes
per call). Every backend is run through the dispatch layer (`ops.<op>(..., backend=name)`), so what
is timed is exactly what the model calls.

Work formulas (stated again under the printed tables):
  causal attention fwd   FLOPs = 4 * B * H * D * T (T + 1) / 2   (q k^T and p v, 2 FLOPs per MAC, the
                                 T (T + 1) / 2 query-key pairs a causal mask keeps; docs/PERF.md)
  causal attention bwd   = 2.5 x fwd (5 matmuls instead of 2), so fwd+bwd = 3.5 x fwd
  layer norm fwd         bytes = (2 * M * N + 2 * N) * e       (read x, write y, read w and b)
  layer norm fwd+bwd     bytes = (5 * M * N + 5 * N) * e       (+ bwd: read x, dy, w; write dx, dw, db)
  gelu mlp fwd           FLOPs = 2 * M * C * F * 2              (two matmuls C->F and F->C)
  gelu mlp fwd+bwd       = 3 x fwd                              (bwd: dX and dW for each matmul)
  decode attention       bytes = (2 * H * D * sum(cache_lens) + 2 * B * H * Tq * D) * e
                                 (K and V of the valid cache prefix, read q, write out)
  sampling               bytes = B * V * e                      (the logits, read once)
  quantized linear       bytes = N * K * bits / 8 + scale / zero bytes + (M * K + M * N) * e
                                 (the packed weight and its scales read once, x read, y written)
e = bytes per element of the benchmark dtype. Bias / GELU FLOPs and softmax exponentials are left
out (they are < 1 % of the matmul FLOPs at these shapes), as in FlashAttention's benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# --------------------------------------------------------------------------- work formulas


def attention_flops(B: int, H: int, T: int, D: int, mode: str = "fwd") -> float:
    """FLOPs of causal attention: 4*B*H*D*T(T+1)/2 forward (the exact causal count: T(T+1)/2 kept
    query-key pairs, each a D-long dot in q k^T and in p v, 2 FLOPs per multiply-add); backward =
    2.5x forward. The one attention-FLOP formula of gptfast (docs/PERF.md#flop-formulas)."""
    fwd = 4.0 * B * H * D * T * (T + 1) / 2
    return fwd if mode == "fwd" else 3.5 * fwd


def layer_norm_bytes(M: int, N: int, elem: int, mode: str = "fwd") -> float:
    """Bytes a LayerNorm over (M, N) must move: fwd (2MN + 2N) e, fwd+bwd (5MN + 5N) e."""
    return float((2 * M * N + 2 * N) * elem if mode == "fwd" else (5 * M * N + 5 * N) * elem)


def mlp_flops(M: int, C: int, F: int, mode: str = "fwd") -> float:
    """FLOPs of the GELU MLP (M, C) -> (M, F) -> (M, C): 2*M*C*F*2 forward, x3 for fwd+bwd."""
    fwd = 2.0 * M * C * F * 2
    return fwd if mode == "fwd" else 3.0 * fwd


def decode_bytes(B: int, H: int, D: int, cache_lens: list[int], elem: int, Tq: int = 1) -> float:
    """Bytes a decode-attention step must move: K and V of the valid prefix + q + out."""
    return float((2 * H * D * sum(cache_lens) + 2 * B * H * Tq * D) * elem)


def sampling_bytes(B: int, V: int, elem: int) -> float:
    """Bytes a sampler must read: the (B, V) logits once."""
    return float(B * V * elem)


def quantized_linear_bytes(M: int, N: int, K: int, bits: int, group_size: int | None, zero: bool,
                           elem: int) -> float:
    """Bytes a quantized linear (M, K) x (N, K)^T must move: the packed weight (bits / 8 bytes per
    weight) and its scales (fp32 per channel, fp16 per group) and zeros once, x read, y written."""
    scales = N * 4 if group_size is None else N * (K // group_size) * 2 * (2 if zero else 1)
    return float(N * K * bits // 8 + scales + (M * K + M * N) * elem)


# --------------------------------------------------------------------------- the case table


@dataclass(frozen=True)
class Case:
    """One benchmark row group: an op, a mode and a shape, run for every backend.

    op: a name in `gptfast.ops.OPS`; label: what the table shows; mode: 'fwd' or 'fwd+bwd';
    shape: named dimensions (ints; `lens` for decode is derived); options: extra op arguments
    (sampling's top_k / top_p); quick: whether `--quick` runs it.
    """

    op: str
    label: str
    mode: str
    shape: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def shape_str(self) -> str:
        s = self.shape
        if self.op == "causal_attention":
            return f"B{s['B']} H{s['H']} T{s['T']} D{s['D']}"
        if self.op == "layer_norm":
            return f"{s['M']}x{s['N']}"
        if self.op == "gelu_mlp":
            return f"{s['M']}x({s['C']}->{s['F']}->{s['C']})"
        if self.op == "decode_attention":
            return f"B{s['B']} H{s['H']} cache{s['T_max']} D{s['D']}"
        if self.op == "sample":
            return f"B{s['B']} V{s['V']} k{self.options['top_k']} p{self.options['top_p']}"
        return " ".join(f"{k}{v}" for k, v in s.items())

    @property
    def id(self) -> str:
        """A stable name for pytest ids and history rows: 'attention fwd B1 H12 T1024 D64'."""
        return f"{self.label} {self.mode} {self.shape_str}"

    def work(self, dtype: torch.dtype) -> tuple[float | None, float | None]:
        """(FLOPs, bytes) per call; one of them is None when it does not define the row's metric."""
        s, e = self.shape, torch.empty((), dtype=dtype).element_size()
        if self.op == "causal_attention":
            return attention_flops(s["B"], s["H"], s["T"], s["D"], self.mode), None
        if self.op == "layer_norm":
            return None, layer_norm_bytes(s["M"], s["N"], e, self.mode)
        if self.op == "gelu_mlp":
            return mlp_flops(s["M"], s["C"], s["F"], self.mode), None
        if self.op == "decode_attention":
            return None, decode_bytes(s["B"], s["H"], s["D"], decode_lens(s["B"], s["T_max"]), e)
        if self.op == "sample":
            return None, sampling_bytes(s["B"], s["V"], e)
        raise ValueError(f"Case.work: unknown op {self.op!r}")


def decode_lens(B: int, T_max: int) -> list[int]:
    """Valid cache lengths of a decode batch: row 0 full, later rows shorter (ragged batches are
    the normal case in batched serving, and they exercise the per-row length handling)."""
    step = T_max // (2 * B) if B > 1 else 0
    return [T_max - step * b for b in range(B)]


def _attn(B, H, T, D, mode):
    return Case("causal_attention", "attention", mode, dict(B=B, H=H, T=T, D=D))


def _ln(M, N, mode):
    return Case("layer_norm", "layer_norm", mode, dict(M=M, N=N))


def _mlp(M, C, F, mode):
    return Case("gelu_mlp", "gelu_mlp", mode, dict(M=M, C=C, F=F))


def _decode(B, T_max):
    return Case("decode_attention", "decode_attn", "fwd", dict(B=B, H=12, T_max=T_max, D=64))


def _sample(B, V=50257):
    return Case("sample", "sampling", "fwd", dict(B=B, V=V), dict(temperature=1.0, top_k=50, top_p=0.9))


# Issue 4's shapes: GPT-2 small (12 heads of 64, width 768, MLP 3072, vocab 50257).
OPS_CASES: list[Case] = [
    _attn(1, 12, 1024, 64, "fwd"),
    _attn(8, 12, 256, 64, "fwd"),
    _attn(1, 12, 1024, 64, "fwd+bwd"),
    _attn(8, 12, 256, 64, "fwd+bwd"),
    _ln(8192, 768, "fwd"),
    _ln(8192, 768, "fwd+bwd"),
    _mlp(2048, 768, 3072, "fwd"),
    _mlp(2048, 768, 3072, "fwd+bwd"),
    _decode(1, 1024),
    _decode(8, 1024),
    _sample(1),
    _sample(8),
]

# `--quick`: the same ops at smaller sizes (GPT-2 widths kept, fewer tokens) so that the whole
# ops suite, every backend included, finishes in well under a minute on 2 CPU cores.
QUICK_OPS_CASES: list[Case] = [
    _attn(1, 4, 256, 64, "fwd"),
    _attn(1, 4, 256, 64, "fwd+bwd"),
    _ln(1024, 768, "fwd"),
    _ln(1024, 768, "fwd+bwd"),
    _mlp(128, 768, 3072, "fwd"),
    _mlp(128, 768, 3072, "fwd+bwd"),
    _decode(1, 256),
    _decode(8, 256),
    _sample(1),
    _sample(8),
]


def scaling_cases(device_type: str, quick: bool) -> list[Case]:
    """Causal attention fwd at B=1, H=12, D=64 for growing T (the O(T^2) plot)."""
    if quick:
        Ts = [128, 256, 512]
    elif device_type == "cuda":
        Ts = [128, 256, 512, 1024, 2048, 4096]
    else:
        Ts = [128, 256, 512, 1024, 2048]
    return [_attn(1, 12, T, 64, "fwd") for T in Ts]


# --------------------------------------------------------------------------- inputs and calls


def build_inputs(case: Case, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> dict[str, Any]:
    """The op's tensor arguments for `case` (deterministic for a seed), plus `grad_out` for
    fwd+bwd cases. Tensors are created in fp32 and cast, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    s = case.shape

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    if case.op == "causal_attention":
        B, H, T, D = s["B"], s["H"], s["T"], s["D"]
        x = dict(q=randn(B, H, T, D), k=randn(B, H, T, D), v=randn(B, H, T, D))  # (B, H, T, D)
        if case.mode != "fwd":
            x["grad_out"] = randn(B, H, T, D)
    elif case.op == "layer_norm":
        M, N = s["M"], s["N"]
        x = dict(x=randn(M, N), weight=1.0 + randn(N, std=0.1), bias=randn(N, std=0.1))
        if case.mode != "fwd":
            x["grad_out"] = randn(M, N)
    elif case.op == "gelu_mlp":
        M, C, F = s["M"], s["C"], s["F"]
        # GPT-2's init scale (std 0.02) keeps the pre-activations in GELU's curved region.
        x = dict(x=randn(M, C), w_fc=randn(F, C, std=0.02), b_fc=randn(F, std=0.02),
                 w_proj=randn(C, F, std=0.02), b_proj=randn(C, std=0.02))
        if case.mode != "fwd":
            x["grad_out"] = randn(M, C)
    elif case.op == "decode_attention":
        B, H, T_max, D = s["B"], s["H"], s["T_max"], s["D"]
        x = dict(q=randn(B, H, 1, D), k_cache=randn(B, H, T_max, D), v_cache=randn(B, H, T_max, D),
                 cache_lens=torch.tensor(decode_lens(B, T_max), dtype=torch.int32, device=device))
    elif case.op == "sample":
        x = dict(logits=randn(s["B"], s["V"], std=3.0))  # (B, V)
    else:
        raise ValueError(f"build_inputs: unknown op {case.op!r}")
    return x


_TENSOR_ARGS = {
    "causal_attention": ("q", "k", "v"),
    "layer_norm": ("x", "weight", "bias"),
    "gelu_mlp": ("x", "w_fc", "b_fc", "w_proj", "b_proj"),
    "decode_attention": ("q", "k_cache", "v_cache", "cache_lens"),
    "sample": ("logits",),
}


def make_call(case: Case, backend: str, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A zero-argument function running the case once on `backend` (what is timed).

    fwd: returns the op's output. fwd+bwd: returns [out, *grads] from `torch.autograd.grad`
    (no `.grad` accumulation, so repeated calls do identical work).
    """
    from gptfast import ops

    fn = getattr(ops, case.op)
    names = _TENSOR_ARGS[case.op]
    if case.mode == "fwd":
        args = [inputs[n] for n in names]
        opts = dict(case.options)  # sampling's temperature / top_k / top_p
        return lambda: fn(*args, backend=backend, **opts)
    leaves = [inputs[n].detach().clone().requires_grad_(True) for n in names]
    grad_out = inputs["grad_out"]

    def fwd_bwd():
        out = fn(*leaves, backend=backend)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

    return fwd_bwd


def dispatch_call(case: Case, inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `ops.unavailable_reason` needs to decide if a backend supports it."""
    first = inputs[_TENSOR_ARGS[case.op][0]]
    call: dict[str, Any] = dict(dtype=first.dtype)
    if case.op == "causal_attention":
        call.update(head_dim=first.shape[-1], dropout_p=0.0)
    elif case.op == "decode_attention":
        call.update(head_dim=first.shape[-1])
    elif case.op == "layer_norm":
        call.update(n=first.shape[-1])
    return call


# --------------------------------------------------------------------------- correctness check

# The accuracy check before timing is the project's one rule (gptfast/testing.py, FlashAttention's):
# the truth is the reference on the inputs upcast to fp64, and a backend may be off from it by at
# most 2x the error of plain PyTorch (the reference code) run in the benchmark dtype on the same
# inputs, plus one rounding of the output. The baseline is the reference, never a backend under
# test: a wrong `torch` backend must not widen it. A wrong kernel is off by O(1) and never timed.
# PyTorch's fused op (the `torch` backend) is PyTorch's own error too: it joins the baseline while
# it is trustworthy (gptfast.testing.pytorch_baselines, TORCH_TRUST).


def tolerance(case: Case, inputs: dict[str, Any], refs):
    """What a backend's error is measured against on this case: one list per output of PyTorch's
    own outputs in the benchmark dtype (the reference composite, plus the `torch` backend's fused
    op when it is trustworthy, see TORCH_TRUST); None for sampling (checked by set)."""
    from gptfast import ops
    from gptfast.testing import pytorch_baselines

    if case.op == "sample":
        return None

    def outputs(backend):
        out = make_call(case, backend, inputs)()
        return [out] if torch.is_tensor(out) else list(out)

    composite = outputs("reference")
    fused = [None] * len(composite)
    first = inputs[_TENSOR_ARGS[case.op][0]]
    if ops.unavailable_reason("torch", case.op, first.device.type, **dispatch_call(case, inputs)) is None:
        got = outputs("torch")
        if len(got) == len(composite):
            fused = got
    return [pytorch_baselines(r, c, f) for r, c, f in zip(refs, composite, fused)]


def reference_outputs(case: Case, inputs: dict[str, Any]) -> list[torch.Tensor] | torch.Tensor:
    """The truth: the `reference` backend on the inputs upcast to fp64.

    For sampling, the (B, V) distribution the reference draws from (tokens it keeps are > 0).
    """
    from gptfast.ops import reference

    if case.op == "sample":
        o = case.options
        return reference.sampling_filter(inputs["logits"], o["temperature"], o["top_k"], o["top_p"])
    up = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    out = make_call(case, "reference", up)()
    return [out] if torch.is_tensor(out) else list(out)


def relative_error(outs, refs) -> float:
    """max over outputs of max|out - ref| / max|ref| (computed in fp32, NaN counts as infinite)."""
    outs = [outs] if torch.is_tensor(outs) else outs
    worst = 0.0
    for o, r in zip(outs, refs):
        if tuple(o.shape) != tuple(r.shape):
            return math.inf
        diff = (o.float() - r.float()).abs().max().item()
        if math.isnan(diff):
            return math.inf
        worst = max(worst, diff / max(r.float().abs().max().item(), 1e-12))
    return worst


def check_sampler(case: Case, backend: str, inputs: dict[str, Any], kept: torch.Tensor,
                  draws: int = 4) -> str | None:
    """None if every token `backend` samples lies in the reference's kept set, else what went
    wrong. (Backends may use different random streams, so tokens are not compared one to one.)"""
    from gptfast import ops

    logits = inputs["logits"]
    for i in range(draws):
        g = torch.Generator(device=logits.device).manual_seed(1234 + i)
        tok = ops.sample(logits, generator=g, backend=backend, **case.options)
        if tok.shape != (logits.shape[0],) or tok.dtype != torch.int64:
            return f"expected (B,) int64 tokens, got {tok.dtype} {tuple(tok.shape)}"
        if bool((tok < 0).any() | (tok >= logits.shape[1]).any()):
            return f"token id out of range: {tok.tolist()}"
        p = kept.gather(1, tok.view(-1, 1)).squeeze(1)
        if bool((p <= 0).any()):
            bad = int((p <= 0).nonzero()[0, 0])
            return f"row {bad} drew token {int(tok[bad])}, outside the top-k/top-p set"
    return None


def check_backend(case: Case, backend: str, inputs: dict[str, Any], refs, baseline) -> tuple[str | None, float | None]:
    """Run `backend` once and compare it with the fp64 reference `refs` by the project's rule, with
    `baseline` (from `tolerance`) as PyTorch's own error: (None, relative error) when it matches,
    (what is wrong, relative error) when it does not. Exceptions of the backend propagate."""
    from gptfast.testing import error_report

    if case.op == "sample":
        return check_sampler(case, backend, inputs, refs), None
    outs = make_call(case, backend, inputs)()
    outs = [outs] if torch.is_tensor(outs) else list(outs)
    err = relative_error(outs, refs)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, the reference has {len(refs)}; not timed", err
    for i, (o, r, b) in enumerate(zip(outs, refs, baseline)):
        bad = error_report(o, r, b, what=f"output {i}")
        if bad is not None:
            return f"{bad} (tolerance: the fp64 rule); not timed", err
    return None, err
