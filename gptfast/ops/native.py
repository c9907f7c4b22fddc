"""The `native` backend: gptfast's C++ (CPU) and CUDA kernels, registered with `torch.library`.

The op schemas live in csrc/registration.cpp (namespace `gptfast`); the kernels in csrc/cpu/*.cpp
(and csrc/cuda/* on CUDA builds). This module

1. loads the compiled library, lazily, on first use of the backend (`availability`,
   `load_extension` or any op): the `gptfast._C` built by `pip install --no-build-isolation -e .`
   if it exists and matches the sources, else a JIT build with `torch.utils.cpp_extension.load`
   into `$GPTFAST_EXT_DIR/ext-<hash>` (default `$XDG_CACHE_HOME/gptfast` or `~/.cache/gptfast`),
   once per process, under a lock (older builds there beyond the `KEEP_BUILDS` most recently used
   are removed, see `prune_builds`). A failed build warns once and makes `availability` return
   "build failed: <first error line>", so `auto` falls back to the next backend. Importing this
   module builds nothing.
2. registers a fake (meta) kernel for every op of the schema, so the ops trace under
   `torch.compile` / `opcheck`, and autograd for the `*_fwd` / `*_bwd` pairs, so the public ops are
   differentiable (also under `torch.compile`).
3. implements the backend protocol (`NAME`, `availability`, `unsupported`) and the op wrappers,
   with exactly the signatures of `gptfast/ops/reference.py`.

---------------------------------------------------------------------------------------------------
PLUGGING IN THE ATTENTION OPS (for the engineer writing csrc/cpu/attention.cpp & co.)
---------------------------------------------------------------------------------------------------
- Put the Python wrappers in `gptfast/ops/native_attention.py`, defining
      causal_attention(q, k, v, scale=None, dropout_p=0.0)
      decode_attention(q, k_cache, v_cache, cache_lens, scale=None)
  with the signatures of reference.py, calling `torch.ops.gptfast.causal_attention_fwd` /
  `torch.ops.gptfast.decode_attention`. Call `gptfast.ops.native.ensure_loaded()` first thing in
  each (a cheap flag check once loaded). This module imports those two names from it if the file
  exists (an ImportError *inside* that file is not swallowed).
- Optionally define `unsupported(op, **call) -> str | None` there (e.g. head dims, dropout_p > 0):
  this module's `unsupported` calls it for those two ops after its own checks (dtype, kernel
  registered for the device).
- Fake kernels for `causal_attention_fwd/_bwd` and `decode_attention`, and the autograd of
  `causal_attention_fwd` (backward = `causal_attention_bwd`), are registered here (see
  `_register_fakes` / `_register_autograd`). To refine a fake kernel, call
  `torch.library.register_fake("gptfast::<op>", fn)` in native_attention.py (it overrides, and runs
  after ours when imported through this module). Do not call `register_autograd` again for
  `causal_attention_fwd`: edit `_attention_backward` here or tell the owner of this file.
- Kernels register with `TORCH_LIBRARY_IMPL(gptfast, CPU, m)` in their own csrc/cpu/*.cpp; the
  build compiles every csrc/cpu/*.cpp (gptfast/_build.py). `unsupported` reports an op whose CPU
  kernel is not registered yet, so a half-done op is skipped by `auto`, not called.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
import warnings

import torch

from gptfast import _build

NAME = "native"

# Public op -> the library op that implements it (its kernel must be registered for the device).
_OP_KERNEL = {
    "layer_norm": "layer_norm_fwd",
    "gelu_mlp": "gelu_mlp_fwd",
    "sample": "sample",
    "causal_attention": "causal_attention_fwd",
    "decode_attention": "decode_attention",
}
_ATTENTION_OPS = ("causal_attention", "decode_attention")
# dtypes the CPU kernels of layer_norm / gelu_mlp accept (fp64 for gradcheck). `sample` takes any
# floating dtype: the wrapper casts to fp32 first, exactly as the reference does.
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float_dtype() in csrc/cuda/bindings.cpp

# The source checkout (holding csrc/) this package lives in, or None for an installed wheel.
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(_PKG_DIR)
if not os.path.isfile(os.path.join(_ROOT, "csrc", "registration.cpp")):
    _ROOT = None


# ----------------------------------------------------------------------------- loading


class _LoaderState:
    """What the loader found; one per process (tests swap it to simulate a failed build)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded = False
        self.error: str | None = None  # "build failed: ..." once a load has failed
        self.origin: str | None = None  # path of the loaded library
        self.warned = False


_STATE = _LoaderState()
_PY_PARTS_REGISTERED = False  # fakes + autograd: once per process, whatever _STATE says


def ext_dir(h: str) -> str:
    """Build directory of the JIT extension with sources hash `h`."""
    base = os.environ.get("GPTFAST_EXT_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "gptfast")
    return os.path.join(base, f"ext-{h}")


# JIT builds kept in the cache directory: every source change is a new `ext-<hash>` (~4 MB), so
# after each load the least recently used beyond this many, untouched for an hour, are removed.
KEEP_BUILDS = 4
_BUILD_NAME = re.compile(r"ext-[0-9a-f]{16}")


def prune_builds(current: str, keep: int = KEEP_BUILDS, min_age_s: float = 3600.0) -> list[str]:
    """Remove old JIT build directories next to `current` (the one in use, never removed).

    Keeps the `keep` most recently used (`current` counts; use = mtime, refreshed on every load)
    and anything used in the last `min_age_s` seconds (another process may be building it).
    Only directories named like ours (`ext-` + 16 hex digits) are considered. Returns the removed.
    """
    base = os.path.dirname(current)
    try:
        names = [n for n in os.listdir(base) if _BUILD_NAME.fullmatch(n)]
    except OSError:
        return []
    dirs = sorted((os.path.join(base, n) for n in names), key=lambda d: os.path.getmtime(d), reverse=True)
    now = time.time()
    removed = []
    for d in dirs[max(keep, 1):]:
        if os.path.abspath(d) == os.path.abspath(current) or now - os.path.getmtime(d) < min_age_s:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _mark_used(build_dir: str) -> None:
    try:
        os.utime(build_dir)
        prune_builds(build_dir)
    except OSError:
        pass  # a read-only cache still works; it just is not pruned


def _prebuilt() -> str | None:
    """Path of an up-to-date `gptfast._C` (built by setup.py), or None (absent or stale).

    Only the file is located here (find_spec does not load it): loading a stale library would
    register the `gptfast` namespace and prevent the JIT build from registering it again.
    """
    if os.environ.get("GPTFAST_FORCE_JIT") == "1":
        return None
    spec = importlib.util.find_spec("gptfast._C")
    if spec is None or not spec.origin:
        return None
    if _ROOT is not None:  # in a checkout: the sources may have changed since the install
        try:
            with open(spec.origin + _build.HASH_FILE_SUFFIX) as f:
                recorded = f.read().strip()
        except OSError:
            return None
        if recorded != _build.sources_hash(_ROOT, for_setup=True):
            return None
    return spec.origin


def _import_prebuilt(path: str) -> str:
    importlib.import_module("gptfast._C")  # its static initialisers register the kernels
    return path


def _jit_build() -> str:
    """JIT-build (or reuse the cached build of) the extension; returns the library path."""
    if _ROOT is None:
        raise RuntimeError("no gptfast._C and no csrc/ sources to build it from (installed without the extension)")
    h = _build.sources_hash(_ROOT, for_setup=False)
    name = f"gptfast_C_{h}"
    build_dir = ext_dir(h)
    lib = os.path.join(build_dir, f"{name}.so")
    if os.path.isfile(lib):  # cached: skip ninja (and the need for a compiler) entirely
        try:
            torch.ops.load_library(lib)
            _mark_used(build_dir)
            return lib
        except OSError:
            pass  # a half-written library from an interrupted build: rebuild below
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    kw = _build.extension_kwargs(_ROOT, for_setup=False)

    def build():
        cpp_extension.load(
            name=name,
            sources=kw["sources"],
            extra_cflags=kw["extra_compile_args"]["cxx"],
            extra_cuda_cflags=kw["extra_compile_args"].get("nvcc"),
            extra_ldflags=kw["extra_link_args"],
            with_cuda=kw["with_cuda"],
            build_directory=build_dir,
            is_python_module=False,  # loads with torch.ops.load_library: kernels register statically
            verbose=os.environ.get("GPTFAST_VERBOSE_BUILD") == "1",
        )

    # The first use after a source change compiles for about a minute: say so (issue #19), on
    # stderr so that piped output stays clean.
    t0 = time.perf_counter()
    print(f"gptfast: building the native extension in {build_dir} (first use after a source change; "
          "about a minute)...", file=sys.stderr, flush=True)
    try:
        build()
    except OSError:
        # Another process held the build lock and its build failed (or it was killed): cpp_extension
        # then only reports "Could not load this library". Build once ourselves for the real error.
        build()
    print(f"gptfast: building the native extension: done in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    _mark_used(build_dir)
    return lib


def _first_error_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
            return ln[:300]
    return lines[0][:300] if lines else type(exc).__name__


def load_extension() -> str:
    """Load the native library (building it if needed); returns its path.

    Raises RuntimeError("build failed: ...") if it cannot be built or loaded; the failure is
    remembered, so later calls fail fast (one build attempt per process).
    """
    state = _STATE
    if state.loaded:
        return state.origin  # type: ignore[return-value]
    with state.lock:
        if not state.loaded and state.error is None:
            try:
                path = _prebuilt()
                state.origin = _import_prebuilt(path) if path else _jit_build()
                _register_python_parts()
                state.loaded = True
            except Exception as e:  # noqa: BLE001  (any build/load failure -> fall back)
                state.error = "build failed: " + _first_error_line(e)
        if state.error is not None:
            if not state.warned:
                state.warned = True
                warnings.warn(
                    f"gptfast: the native extension is unavailable ({state.error}); "
                    "`auto` falls back to other backends. Set GPTFAST_VERBOSE_BUILD=1 for the full log.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            raise RuntimeError(state.error)
    return state.origin  # type: ignore[return-value]


def ensure_loaded() -> None:
    """Cheap once loaded (a flag check that `torch.compile` traces through)."""
    if not _STATE.loaded:
        load_extension()


# ----------------------------------------------------------------------------- fake kernels


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # The C++ kernels always return contiguous tensors: the fakes must say the same.
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _fake_check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("gptfast::layer_norm_fwd")
    def _(x, weight, bias, eps):
        _fake_check(x.dim() == 2, f"layer_norm_fwd: x must be 2-D (M, N), got {tuple(x.shape)}")
        M, N = x.shape
        for name, t in (("weight", weight), ("bias", bias)):
            _fake_check(t is None or tuple(t.shape) == (N,), f"layer_norm_fwd: {name} must have shape ({N},)")
            _fake_check(t is None or t.device == x.device, f"layer_norm_fwd: {name} must be on x's device")
        return _empty((M, N), x), _empty((M,), x, torch.float32), _empty((M,), x, torch.float32)

    @reg("gptfast::layer_norm_bwd")
    def _(dy, x, weight, mean, rstd):
        _fake_check(x.dim() == 2 and dy.shape == x.shape, "layer_norm_bwd: dy and x must be (M, N)")
        M, N = x.shape
        return _empty((M, N), x), _empty((N,), x), _empty((N,), x)

    @reg("gptfast::gelu_mlp_fwd")
    def _(x, w_fc, b_fc, w_proj, b_proj, exact=False):
        _fake_check(x.dim() == 2 and w_fc.dim() == 2 and w_proj.dim() == 2, "gelu_mlp_fwd: x, w_fc, w_proj must be 2-D")
        _fake_check(w_fc.shape[1] == x.shape[1] and w_proj.shape[1] == w_fc.shape[0], "gelu_mlp_fwd: shape mismatch")
        M, F = x.shape[0], w_fc.shape[0]
        return _empty((M, w_proj.shape[0]), x), _empty((M, F), x)

    @reg("gptfast::gelu_mlp_infer")
    def _(x, w_fc, b_fc, w_proj, b_proj, exact=False):
        _fake_check(x.dim() == 2 and w_fc.dim() == 2 and w_proj.dim() == 2, "gelu_mlp_infer: x, w_fc, w_proj must be 2-D")
        _fake_check(w_fc.shape[1] == x.shape[1] and w_proj.shape[1] == w_fc.shape[0], "gelu_mlp_infer: shape mismatch")
        return _empty((x.shape[0], w_proj.shape[0]), x)

    @reg("gptfast::gelu_mlp_bwd")
    def _(dy, x, w_fc, w_proj, pre, exact=False):
        F, C = w_fc.shape
        C_out = w_proj.shape[0]
        return (_empty(tuple(x.shape), x), _empty((F, C), x), _empty((F,), x),
                _empty((C_out, F), x), _empty((C_out,), x))

    @reg("gptfast::causal_attention_fwd")
    def _(q, k, v, scale):
        _fake_check(q.dim() == 4, f"causal_attention_fwd: q must be 4-D (B, H, T, D), got {tuple(q.shape)}")
        B, H, T, D = q.shape
        return _empty((B, H, T, D), q), _empty((B, H, T), q, torch.float32)

    @reg("gptfast::causal_attention_bwd")
    def _(dout, q, k, v, out, lse, scale):
        return _empty(tuple(q.shape), q), _empty(tuple(k.shape), k), _empty(tuple(v.shape), v)

    @reg("gptfast::decode_attention")
    def _(q, k_cache, v_cache, cache_lens, scale):
        return _empty(tuple(q.shape), q)

    @reg("gptfast::skinny_linear")
    def _(x, weight, bias):
        _fake_check(x.dim() == 2 and weight.dim() == 2, "skinny_linear: x and weight must be 2-D")
        _fake_check(weight.shape[1] == x.shape[1], f"skinny_linear: weight must have shape (N, {x.shape[1]})")
        _fake_check(bias is None or tuple(bias.shape) == (weight.shape[0],),
                    f"skinny_linear: bias must have shape ({weight.shape[0]},)")
        return _empty((x.shape[0], weight.shape[0]), x)

    @reg("gptfast::decode_step")
    def _(tokens, pos, wte, wpe, layers, lnf_w, lnf_b, w_head, k_cache, v_cache, eps, exact_gelu=False):
        _fake_check(tokens.dim() == 1, f"decode_step: tokens must be 1-D (B,), got {tuple(tokens.shape)}")
        _fake_check(w_head.dim() == 2, f"decode_step: w_head must be 2-D (V, C), got {tuple(w_head.shape)}")
        _fake_check(len(layers) == 12 * len(k_cache) and len(k_cache) == len(v_cache),
                    "decode_step: layers must hold 12 entries per cache layer")
        return _empty((tokens.shape[0], w_head.shape[0]), wpe, torch.float32)

    @reg("gptfast::erf")
    def _(x):
        return _empty(tuple(x.shape), x)

    @reg("gptfast::sample")
    def _(logits, temperature, top_k, top_p, uniform):
        _fake_check(logits.dim() == 2, f"sample: logits must be 2-D (B, V), got {tuple(logits.shape)}")
        return _empty((logits.shape[0],), logits, torch.int64)


# ----------------------------------------------------------------------------- autograd


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.gptfast.layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


def _mlp_setup(ctx, inputs, output):
    x, w_fc, b_fc, w_proj, b_proj = inputs[:5]
    _y, pre = output
    ctx.save_for_backward(x, w_fc, w_proj, pre)
    ctx.has_b = (b_fc is not None, b_proj is not None)
    ctx.exact = bool(inputs[5]) if len(inputs) > 5 else False  # the schema's default
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(pre)


def _mlp_backward(ctx, dy, _dpre):
    x, w_fc, w_proj, pre = ctx.saved_tensors
    dx, dw_fc, db_fc, dw_proj, db_proj = torch.ops.gptfast.gelu_mlp_bwd(dy, x, w_fc, w_proj, pre, ctx.exact)
    grads = (dx, dw_fc, (db_fc if ctx.has_b[0] else None), dw_proj, (db_proj if ctx.has_b[1] else None))
    return grads + (None,) * (ctx.n_inputs - 5)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.gptfast.causal_attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def _skinny_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _skinny_backward(ctx, dy):
    # Training-size shapes: plain ATen matmuls (the kernel is a forward for few rows).
    x, weight = ctx.saved_tensors
    # bf16 weight with fp32 x (weight-only bf16): fp32 math, the weight's gradient in its dtype.
    return dy @ weight.to(dy.dtype), (dy.t() @ x).to(weight.dtype), (dy.sum(0) if ctx.has_bias else None)


def _register_autograd() -> None:
    reg = torch.library.register_autograd
    reg("gptfast::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)
    reg("gptfast::gelu_mlp_fwd", _mlp_backward, setup_context=_mlp_setup)
    reg("gptfast::causal_attention_fwd", _attention_backward, setup_context=_attention_setup)
    reg("gptfast::skinny_linear", _skinny_backward, setup_context=_skinny_setup)


def _register_python_parts() -> None:
    global _PY_PARTS_REGISTERED
    if not _PY_PARTS_REGISTERED:
        _register_fakes()
        _register_autograd()
        _PY_PARTS_REGISTERED = True


# ----------------------------------------------------------------------------- backend protocol


def _has_kernel(lib_op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gptfast::{lib_op}", key)


def availability(device_type: str) -> str | None:
    """None if the native library is loaded (built on first call) and has kernels for the device."""
    if device_type not in ("cpu", "cuda"):
        return f"no native kernels for device type {device_type!r}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        ensure_loaded()
    except RuntimeError:
        return _STATE.error
    if not any(_has_kernel(k, device_type) for k in _OP_KERNEL.values()):
        return f"the native extension was built without {device_type.upper()} kernels"
    return None


def unsupported(op: str, device_type: str = "cpu", dtype: torch.dtype | None = None, **call) -> str | None:
    """None if this call can run natively, else why not (op missing for the device, dtype, ...)."""
    lib_op = _OP_KERNEL.get(op)
    if lib_op is None:
        return f"{op} has no native kernel"
    if not _STATE.loaded:
        reason = availability(device_type)
        if reason is not None:
            return reason
    if not _has_kernel(lib_op, device_type):
        return f"no native {device_type.upper()} kernel registered for {op}"
    if op in ("layer_norm", "gelu_mlp") and device_type == "cpu" and dtype is not None and dtype not in _CPU_DTYPES:
        return f"native CPU {op} supports float32 and float64, got {dtype}"
    if op in ("layer_norm", "gelu_mlp", "sample") and device_type == "cuda" and dtype is not None and dtype not in _CUDA_DTYPES:
        return f"native CUDA {op} supports float32, float16 and bfloat16, got {dtype}"
    if op in _ATTENTION_OPS and _attention is not None and hasattr(_attention, "unsupported"):
        return _attention.unsupported(op, device_type=device_type, dtype=dtype, **call)
    return None


# ----------------------------------------------------------------------------- ops


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dim; see `reference.layer_norm`. x: (..., N); weight, bias: (N,) or None."""
    ensure_loaded()
    N = x.shape[-1]
    y, _mean, _rstd = torch.ops.gptfast.layer_norm_fwd(x.reshape(-1, N), weight, bias, float(eps))  # (M, N)
    return y.view(x.shape)


def gelu_mlp(
    x: torch.Tensor,
    w_fc: torch.Tensor,
    b_fc: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    activation: str = "gelu_tanh",
) -> torch.Tensor:
    """gelu(x w_fc^T + b_fc) w_proj^T + b_proj; see `reference.gelu_mlp`. x: (..., C).
    activation "gelu" runs the kernels with exact=True (erf GELU), "gelu_tanh" with exact=False."""
    ensure_loaded()
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    exact = activation == "gelu"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_fc, b_fc, w_proj, b_proj)):
        y, _pre = torch.ops.gptfast.gelu_mlp_fwd(x2, w_fc, b_fc, w_proj, b_proj, exact)  # pre saved for backward
    else:  # inference: no pre to keep, GELU in place
        y = torch.ops.gptfast.gelu_mlp_infer(x2, w_fc, b_fc, w_proj, b_proj, exact)
    return y.view(*x.shape[:-1], w_proj.shape[0])


# Largest M for which `skinny_linear` beats torch.mm / addmm on CPU fp32 (measured; the C++ side
# uses the same number, kSkinnyMaxM in csrc/cpu/skinny_linear.h, inside gelu_mlp's forward).
SKINNY_MAX_M = 16


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N,) -> (M, N): `F.linear` for a few rows (CPU, fp32/fp64).

    Streams the weight once whatever M is (batched decoding); weight in nn.Linear layout, inner
    stride 1 (anything else is copied first). On CPU the weight may also be bf16 with fp32 x
    (weight-only bf16: widened exactly, accumulated in fp32; output fp32). Differentiable
    (backward with ATen matmuls).
    """
    ensure_loaded()
    return torch.ops.gptfast.skinny_linear(x, weight, bias)


def decode_step(tokens, pos, wte, wpe, layers, lnf_w, lnf_b, w_head, k_cache, v_cache, eps: float,
                exact_gelu: bool = False) -> torch.Tensor:
    """One GPT-2 decoding step in one native CPU op (no Python between kernels): tokens, pos (B,)
    int64 -> logits (B, V) fp32, writing each row's K/V into `k_cache` / `v_cache` at pos.

    Arguments as the schema in csrc/registration.cpp (`layers`: 12 tensors or None per block,
    nn.Linear layouts, matrices fp32 or bf16; exact_gelu: the erf GELU instead of the tanh one).
    `gptfast.engine` builds them; see
    csrc/cpu/decode_step.cpp for what it computes.
    """
    ensure_loaded()
    return torch.ops.gptfast.decode_step(tokens, pos, wte, wpe, layers, lnf_w, lnf_b, w_head, k_cache, v_cache,
                                         float(eps), bool(exact_gelu))


def decode_step_available() -> bool:
    """Whether the loaded library has the fused CPU decode step (False if not built)."""
    try:
        ensure_loaded()
    except RuntimeError:
        return False
    return _has_kernel("decode_step", "cpu")


def skinny_linear_available(device_type: str = "cpu") -> bool:
    """Whether the loaded library has a `skinny_linear` kernel for the device (False if not built)."""
    try:
        ensure_loaded()
    except RuntimeError:
        return False
    return device_type in ("cpu", "cuda") and _has_kernel("skinny_linear", device_type)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64, token-for-token as `reference.sample`.

    The uniform draw is made here with torch.rand exactly as the reference makes it (and not at
    all for temperature 0), so both consume the generator identically and pick the same tokens.
    """
    ensure_loaded()
    if logits.dtype not in _CPU_DTYPES:
        logits = logits.float()  # exact for fp16/bf16; the reference works in fp32 as well
    B = logits.shape[0]
    if temperature == 0.0:
        uniform = torch.zeros(B, device=logits.device, dtype=torch.float32)  # unused: argmax
    else:
        uniform = torch.rand(B, generator=generator, device=logits.device, dtype=torch.float32)
    return torch.ops.gptfast.sample(
        logits,
        float(temperature),
        0 if top_k is None else int(top_k),
        1.0 if top_p is None else float(top_p),
        uniform,
    )


# The attention wrappers live in their own file (see the comment block at the top).
_attention = None
if importlib.util.find_spec("gptfast.ops.native_attention") is not None:
    from gptfast.ops import native_attention as _attention  # noqa: E402

    for _name in _ATTENTION_OPS:
        if hasattr(_attention, _name):
            globals()[_name] = getattr(_attention, _name)
