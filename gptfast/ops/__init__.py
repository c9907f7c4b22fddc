"""One function per hot op, many interchangeable backends.

    from gptfast import ops
    y = ops.causal_attention(q, k, v)                       # backend picked by `auto`
    y = ops.causal_attention(q, k, v, backend="reference")  # the truth
    with gptfast.use_backend("torch"): ...                  # scoped choice

Backends (see `BACKENDS`): `reference` (readable pure PyTorch), `torch` (PyTorch's fused ops, the
baseline), `native` (our C++ on CPU / CUDA on GPU, registered with `torch.library`), `triton` (our
Triton kernels). `auto` tries triton (CUDA tensors only), then native, then torch, then reference,
and takes the first that is available for the op, the device and the call (`explain` says why).

Choice, strongest first: the `backend=` argument of a call (a model passes its own), then
`use_backend(...)`, then `set_backend(...)`, then the `GPTFAST_BACKEND` environment variable,
else `auto`.

Every public op validates its inputs here, once, for all backends: a bad argument raises
`ValueError` / `TypeError` naming the argument, what was expected and what came.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import os
from types import ModuleType
from typing import Iterator

import torch

from gptfast.errors import UserError
from gptfast.ops.quant import check_quantized
from gptfast.ops.reference import draw_uniform

BACKENDS = ("reference", "torch", "native", "triton")
OPS = ("causal_attention", "layer_norm", "gelu_mlp", "linear", "decode_attention", "sample", "quantized_linear")
_AUTO_ORDER = ("triton", "native", "torch", "reference")
_ACTIVATIONS = ("gelu_tanh", "gelu")  # gelu_mlp's; = gptfast.config.ACTIVATIONS
_MODULES = {
    "reference": "gptfast.ops.reference",
    "torch": "gptfast.ops.torch_ops",
    "native": "gptfast.ops.native",
    "triton": "gptfast.ops.triton_ops",
}

_global_backend: str | None = None
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gptfast_backend", default=None
)
_module_cache: dict[str, ModuleType | str] = {}


class BackendUnavailableError(UserError, RuntimeError):
    """The requested backend cannot run this op here (not built, not installed, unsupported call).
    A `UserError`: the CLI prints it as one line (the user asked for that backend)."""


# ----------------------------------------------------------------------------- backend selection


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend ('auto', a name in BACKENDS, or None to clear)."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside use `name` unless a call passes `backend=` itself."""
    token = _scoped_backend.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force for a call (before `auto` is resolved)."""
    if backend is not None:
        return _check_name(backend, "backend")
    scoped = _scoped_backend.get()
    if scoped is not None:
        return scoped
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("GPTFAST_BACKEND")
    if env:
        return _check_name(env, "GPTFAST_BACKEND")
    return "auto"


def _load(name: str) -> ModuleType | str:
    """The backend module, or a one-line reason why it cannot be imported."""
    if name not in _module_cache:
        try:
            _module_cache[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:  # a backend module that is missing its dependency
            _module_cache[name] = f"not installed ({e})"
    return _module_cache[name]


def unavailable_reason(name: str, op: str, device_type: str, **call) -> str | None:
    """None if backend `name` can run `op` on `device_type` for this call, else the reason."""
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    reason = mod.availability(device_type)
    if reason is not None:
        return reason
    if not hasattr(mod, op):
        return f"{op} not implemented"
    return mod.unsupported(op, device_type=device_type, **call)


def resolve(op: str, device_type: str = "cpu", backend: str | None = None, **call) -> str:
    """Name of the backend that runs `op` on `device_type` (resolving `auto`)."""
    requested = requested_backend(backend)
    if requested != "auto":
        reason = unavailable_reason(requested, op, device_type, **call)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} is not available on {device_type}: {reason}"
            )
        return requested
    for name in _AUTO_ORDER:
        if name == "triton" and device_type != "cuda":
            continue  # auto: Triton on CUDA only (its CPU interpreter is for tests, by explicit request)
        if unavailable_reason(name, op, device_type, **call) is None:
            return name
    raise BackendUnavailableError(f"{op}: no backend available on {device_type}")  # unreachable


def explain(op: str, device_type: str = "cpu") -> tuple[str, dict[str, str]]:
    """(backend `auto` picks for `op` on `device_type`, {backend: status line}) for `gptfast info`."""
    chosen = None
    status: dict[str, str] = {}
    for name in _AUTO_ORDER:
        reason = unavailable_reason(name, op, device_type)
        if reason is None and name == "triton" and device_type != "cuda":
            status[name] = "available by explicit request only (auto uses Triton on CUDA only)"
            continue
        if reason is None and chosen is None:
            chosen = name
            status[name] = "selected (first available in auto order: " + " > ".join(_AUTO_ORDER) + ")"
        elif reason is None:
            status[name] = "available"
        else:
            status[name] = reason
    assert chosen is not None
    return chosen, status


def resolved(op: str, device_type: str = "cpu", backend: str | None = None, **call):
    """The backend function that runs `op` on `device_type` for this call (resolving `auto` as the
    public op would; `call` as `resolve`'s: dtype=..., head_dim=..., ...).

    No input validation: for callers that validate once and call many times (the generation
    loop). It takes the backend's own signature, which is the public op's without `backend=`,
    except `sample`: (logits, temperature, top_k, top_p, uniform), with `uniform` from
    `draw_uniform`.
    """
    if op not in OPS:
        raise ValueError(f"resolved: unknown op {op!r}; expected one of {OPS}")
    return getattr(_load(resolve(op, device_type, backend, **call)), op)


# ----------------------------------------------------------------------------- input validation


def _check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name: str, t: torch.Tensor, op: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        _check_tensor(name, t, op)
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def _check_weight(op: str, name: str, w, x: torch.Tensor) -> None:
    """A weight matrix: x's device and dtype, or bfloat16 with float32 x (weight-only bf16)."""
    _check_tensor(name, w, op)
    if w.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {w.device}")
    if w.dtype != x.dtype and not (w.dtype == torch.bfloat16 and x.dtype == torch.float32):
        raise TypeError(
            f"{op}: {name} must have x's dtype {x.dtype} (or bfloat16 with float32 x, weight-only bf16), "
            f"got {w.dtype}"
        )


def _check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(
            f"{op}: {name} must be {rank}-D {layout}, got shape {tuple(t.shape)}"
        )


# ----------------------------------------------------------------------------- public ops


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal scaled-dot-product attention: softmax(q k^T * scale, causal mask) v.

    q, k, v: (B, H, T, D), same dtype (fp32/fp16/bf16/fp64) and device; any strides.
    scale: defaults to 1/sqrt(D). dropout_p: probability of dropping an attention weight (training
    only; backends without dropout are skipped by `auto` and refuse explicitly when it is > 0).
    Returns (B, H, T, D). Differentiable w.r.t. q, k, v.
    """
    op = "causal_attention"
    _check_tensor("q", q, op)
    _check_float("q", q, op)
    _check_same(op, "q", q, k=k, v=v)
    _check_rank(op, "q", q, 4, "(B, H, T, D)")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{op}: k and v must have q's shape {tuple(q.shape)} (B, H, T, D), "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head dim D must be > 0, got shape {tuple(q.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    fn = resolved(op, q.device.type, backend, dtype=q.dtype, head_dim=q.shape[-1], dropout_p=dropout_p)
    return fn(q, k, v, scale, float(dropout_p))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension (biased variance, as `torch.nn.LayerNorm`).

    x: (..., N) floating point; weight, bias: (N,) in x's dtype and device, or None.
    Returns x's shape and dtype. Differentiable w.r.t. x, weight, bias.
    """
    op = "layer_norm"
    _check_tensor("x", x, op)
    _check_float("x", x, op)
    _check_same(op, "x", x, weight=weight, bias=bias)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f"{op}: {name} must have shape ({N},), got {tuple(t.shape)}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps!r}")
    fn = resolved(op, x.device.type, backend, dtype=x.dtype, n=N)
    return fn(x, weight, bias, float(eps))


def gelu_mlp(
    x: torch.Tensor,
    w_fc: torch.Tensor,
    b_fc: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    *,
    activation: str = "gelu_tanh",
    backend: str | None = None,
) -> torch.Tensor:
    """GPT-2's MLP, gelu(x w_fc^T + b_fc) w_proj^T + b_proj, with bias + GELU fused.

    x: (..., C); w_fc: (F, C); b_fc: (F,) or None; w_proj: (C_out, F); b_proj: (C_out,) or None
    (`nn.Linear` layout), all one dtype and device, except that w_fc / w_proj may be bfloat16
    when x is float32 (weight-only bf16: the result is fp32 math on the bf16 weights, widened
    exactly). activation: "gelu_tanh" (GPT-2's tanh approximation) or "gelu" (the exact erf GELU,
    `torch.nn.GELU()`; see `GPTConfig.activation`). Returns (..., C_out) in x's dtype.
    Differentiable w.r.t. every tensor argument.
    """
    op = "gelu_mlp"
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _check_tensor("x", x, op)
    _check_float("x", x, op)
    _check_same(op, "x", x, b_fc=b_fc, b_proj=b_proj)
    _check_weight(op, "w_fc", w_fc, x)
    _check_weight(op, "w_proj", w_proj, x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., C), got a 0-D tensor")
    C = x.shape[-1]
    if w_fc.dim() != 2 or w_fc.shape[1] != C:
        raise ValueError(f"{op}: w_fc must have shape (F, {C}), got {tuple(w_fc.shape)}")
    F_ = w_fc.shape[0]
    if w_proj.dim() != 2 or w_proj.shape[1] != F_:
        raise ValueError(f"{op}: w_proj must have shape (C_out, {F_}), got {tuple(w_proj.shape)}")
    if b_fc is not None and tuple(b_fc.shape) != (F_,):
        raise ValueError(f"{op}: b_fc must have shape ({F_},), got {tuple(b_fc.shape)}")
    if b_proj is not None and tuple(b_proj.shape) != (w_proj.shape[0],):
        raise ValueError(
            f"{op}: b_proj must have shape ({w_proj.shape[0]},), got {tuple(b_proj.shape)}"
        )
    # Weight-only bf16 weights go to the backend as they are: the native CPU kernel reads them
    # itself, every other backend function widens them (`.to(x.dtype)`, exact) first.
    fn = resolved(op, x.device.type, backend, dtype=x.dtype, activation=activation)
    return fn(x, w_fc, b_fc, w_proj, b_proj, activation=activation)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """x weight^T + bias, as `torch.nn.functional.linear`.

    x: (..., K) floating point; weight: (N, K) (`nn.Linear` layout) in x's dtype, or bfloat16 when
    x is float32 (weight-only bf16: the result is exactly fp32 math on the bf16 weight, widened
    exactly); bias: (N,) in x's dtype, or None; all on one device. Returns (..., N) in x's dtype.
    Differentiable w.r.t. x, weight and bias. The native backend runs few rows (M = x.numel() // K
    <= `native.SKINNY_MAX_M`, batched decoding) with its skinny kernel on CPU.
    """
    op = "linear"
    _check_tensor("x", x, op)
    _check_float("x", x, op)
    _check_weight(op, "weight", weight, x)
    _check_same(op, "x", x, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., K), got a 0-D tensor")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{op}: weight must have shape (N, {K}) (nn.Linear layout), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    fn = resolved(op, x.device.type, backend, dtype=x.dtype, weight_dtype=weight.dtype)
    return fn(x, weight, bias)


def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int | None,
    act_int8: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """x w^T + bias with w a quantized weight (issue #20; formats and layouts: `gptfast.ops.quant`).

    x: (..., K) floating point (fp32 on CPU; fp32/bf16/fp16 on CUDA; the reference also takes
    fp64). qweight: int8 (N, K) for bits=8, or uint8 (N, K/2) packed int4 for bits=4; scale:
    float32 (N,) per output channel (bits=8, group_size=None) or float16 (N, K/group_size);
    zero: float16 (N, K/group_size) (int4 with a zero point) or None; bias: (N,) in x's dtype or
    None; all on x's device, qweight / scale / zero contiguous. group_size: None or one of
    `quant.GROUP_SIZES` (int4 needs one). act_int8: the native CPU option that quantizes the
    activations per row to int8 on the fly (as llama.cpp does for q8_0 x q8_0); the other backends
    compute weight-only and ignore it. Returns (..., N) in x's dtype; the truth is
    `reference.quantized_linear` (dequantize to x's dtype, then x w^T + b). Inference only.
    """
    op = "quantized_linear"
    _check_tensor("x", x, op)
    _check_float("x", x, op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., K), got a 0-D tensor")
    if not isinstance(act_int8, bool):
        raise TypeError(f"{op}: act_int8 must be a bool, got {type(act_int8).__name__}")
    N, K = check_quantized(op, qweight, scale, zero, bits, group_size)
    if x.shape[-1] != K:
        raise ValueError(
            f"{op}: x must be (..., {K}) to match qweight {tuple(qweight.shape)} (bits={bits}: "
            f"K = {qweight.shape[1]} x {8 // bits}), got shape {tuple(x.shape)}"
        )
    if qweight.device != x.device:
        raise ValueError(f"{op}: qweight must be on x's device {x.device}, got {qweight.device}")
    _check_same(op, "x", x, bias=bias)
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    fn = resolved(op, x.device.type, backend, dtype=x.dtype, bits=bits, group_size=group_size,
                  zero=zero is not None, act_int8=act_int8)
    return fn(x, qweight, scale, zero, bias, bits=bits, group_size=group_size, act_int8=act_int8)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the newest Tq tokens against a preallocated KV cache (inference only).

    q: (B, H, Tq, D), Tq >= 1 (1 for plain decoding, a few for speculative / chunked steps).
    k_cache, v_cache: (B, H, T_max, D), q's dtype and device.
    cache_lens: (B,) int32/int64 on q's device: valid length of each sequence *including* the Tq
    new tokens, Tq <= cache_lens[b] <= T_max. Query i of row b attends to positions
    0 .. cache_lens[b] - Tq + i; nothing at or past cache_lens[b] is read.
    Returns (B, H, Tq, D).
    """
    op = "decode_attention"
    _check_tensor("q", q, op)
    _check_float("q", q, op)
    _check_same(op, "q", q, k_cache=k_cache, v_cache=v_cache)
    _check_rank(op, "q", q, 4, "(B, H, Tq, D)")
    _check_rank(op, "k_cache", k_cache, 4, "(B, H, T_max, D)")
    B, H, Tq, D = q.shape
    if k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must have shape ({B}, {H}, T_max, {D}) to match q "
            f"{tuple(q.shape)}, got k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    T_max = k_cache.shape[2]
    if Tq < 1 or Tq > T_max:
        raise ValueError(f"{op}: q must hold 1..T_max={T_max} query tokens, got Tq={Tq}")
    _check_tensor("cache_lens", cache_lens, op)
    if cache_lens.dtype not in (torch.int32, torch.int64) or tuple(cache_lens.shape) != (B,):
        raise ValueError(
            f"{op}: cache_lens must be an int32/int64 tensor of shape ({B},), "
            f"got {cache_lens.dtype} {tuple(cache_lens.shape)}"
        )
    if cache_lens.device != q.device:
        raise ValueError(f"{op}: cache_lens must be on q's device {q.device}, got {cache_lens.device}")
    # A bounds check reads the lengths: cheap on CPU; on CUDA it would sync, so it is skipped
    # there while a CUDA graph is being captured.
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < Tq or hi > T_max:
            raise ValueError(
                f"{op}: cache_lens must be in [Tq={Tq}, T_max={T_max}], got values in [{lo}, {hi}]"
            )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    fn = resolved(op, q.device.type, backend, dtype=q.dtype, head_dim=D, n_query=Tq)
    return fn(q, k_cache, v_cache, cache_lens, scale)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Sample one token id per row of `logits` (B, V); returns (B,) int64.

    temperature: >= 0; 0 means greedy (argmax). top_k: keep the k most likely tokens (>= 1, or
    None). top_p: nucleus threshold in (0, 1] (or None). generator: a `torch.Generator` on the
    logits' device for reproducible draws: the uniforms are drawn here, once, by `draw_uniform`
    (none at temperature 0), so every backend consumes the generator identically and the
    reference, native, torch and triton backends pick the same tokens. See `reference.sample`.

    Non-finite logits (every backend): a row holding a NaN or +inf, or with no finite value (all
    -inf), raises `gptfast.errors.NonFiniteError` (a ValueError) naming the rows; -inf alone bans
    a token. See `check_logits`.
    """
    op = "sample"
    _check_tensor("logits", logits, op)
    _check_float("logits", logits, op)
    _check_rank(op, "logits", logits, 2, "(B, V)")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty vocabulary dim, got {tuple(logits.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{op}: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"{op}: top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{op}: top_p must be in (0, 1] or None, got {top_p!r}")
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(
            f"{op}: generator must be on the logits' device {logits.device}, got {generator.device}"
        )
    if not (logits.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_logits(logits, op)
    fn = resolved(op, logits.device.type, backend, dtype=logits.dtype)
    uniform = draw_uniform(logits, temperature, generator)  # the one draw, the same for every backend
    return fn(logits, float(temperature), top_k, None if top_p is None else float(top_p), uniform)


def nonfinite_logit_rows(logits: torch.Tensor) -> dict[int, str]:
    """{row: what is wrong} for the rows of (B, V) `logits` that `sample` refuses: a row holding a
    NaN, a row holding +inf, or a row with no finite logit (all -inf). -inf alone is fine: it
    bans a token (top-k / top-p / a grammar do that)."""
    if bool(torch.isfinite(logits).all()):  # the usual case: one pass, one host read
        return {}
    has_nan = torch.isnan(logits).any(-1)
    has_pinf = torch.isposinf(logits).any(-1)
    no_finite = ~torch.isfinite(logits).any(-1)
    bad = (has_nan | has_pinf | no_finite).nonzero().flatten().tolist()
    if not bad:
        return {}
    flags = torch.stack([has_nan, has_pinf, no_finite], -1)[bad].tolist()
    out = {}
    for row, (nan, pinf, none) in zip(bad, flags):
        out[row] = ", ".join(w for w, f in (("NaN", nan), ("+inf", pinf), ("no finite logit", none)) if f)
    return out


def check_logits(logits: torch.Tensor, op: str = "sample") -> None:
    """Raise `NonFiniteError` (a ValueError) naming the rows of `logits` that hold a NaN or +inf
    or no finite value. Such logits come from a failing model; sampling from them would return
    an arbitrary token (reference / native / triton each picked a different one) instead of
    saying so. Rule for +inf: refused too (its softmax is NaN; there is no meaningful draw)."""
    bad = nonfinite_logit_rows(logits)
    if bad:
        from gptfast.errors import NonFiniteError

        rows = list(bad)
        shown = "; ".join(f"row {r}: {bad[r]}" for r in rows[:8]) + ("; ..." if len(rows) > 8 else "")
        raise NonFiniteError(
            f"{op}: logits of shape {tuple(logits.shape)} have non-finite values in "
            f"{len(rows)} row(s) {rows[:8]}{'...' if len(rows) > 8 else ''} ({shown}); "
            "expected finite values or -inf (banned tokens) with at least one finite value per row"
        )


__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "causal_attention",
    "check_logits",
    "decode_attention",
    "draw_uniform",
    "explain",
    "gelu_mlp",
    "layer_norm",
    "linear",
    "nonfinite_logit_rows",
    "quantized_linear",
    "requested_backend",
    "resolve",
    "resolved",
    "sample",
    "set_backend",
    "unavailable_reason",
    "use_backend",
]
