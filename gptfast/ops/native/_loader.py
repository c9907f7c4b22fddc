"""Loading gptfast's native library (csrc/): the prebuilt `gptfast._C` or a JIT build.

The op schemas live in csrc/registration.cpp (namespace `gptfast`); the kernels in csrc/cpu/*.cpp
(and csrc/cuda/* on CUDA builds). The library is loaded lazily, on first use of the backend
(`availability`, `load_extension` or any op): the `gptfast._C` built by
`pip install --no-build-isolation -e .` if it exists and matches the sources, else a JIT build with
`torch.utils.cpp_extension.load` into `$GPTFAST_EXT_DIR/ext-<hash>` (default
`$XDG_CACHE_HOME/gptfast` or `~/.cache/gptfast`), once per process, under a lock (older builds
there beyond the `KEEP_BUILDS` most recently used are removed, see `prune_builds`). A failed build
warns once and makes `availability` return "build failed: <first error line>", so `auto` falls
back to the next backend. Importing this module builds nothing.

Once loaded, `_meta.register` adds the fake kernels and autograd (Python parts of the ops).
Kernels register with `TORCH_LIBRARY_IMPL(gptfast, CPU, m)` in their own csrc/cpu/*.cpp; the build
compiles every csrc/cpu/*.cpp (gptfast/_build.py).
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

# Public op -> the library op that implements it (its kernel must be registered for the device).
_OP_KERNEL = {
    "layer_norm": "layer_norm_fwd",
    "gelu_mlp": "gelu_mlp_fwd",
    "sample": "sample",
    "causal_attention": "causal_attention_fwd",
    "decode_attention": "decode_attention",
    "quantized_linear": "quantized_linear",
}

# The source checkout (holding csrc/) this package lives in, or None for an installed wheel.
# This file is gptfast/ops/native/_loader.py: the package directory gptfast/ is three levels up.
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        # Once loaded, the registered kernels do not change: availability / kernel lookups are
        # answered from here (a dispatcher query costs ~1-2 us, and `auto` asks on every op call).
        self.available: dict[str, str | None] = {}
        self.kernels: dict[tuple[str, str], bool] = {}


_STATE = _LoaderState()


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
                from gptfast.ops.native import _meta  # fakes + autograd (once per process)

                _meta.register()
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


# ----------------------------------------------------------------------------- backend protocol


def _has_kernel(lib_op: str, device_type: str) -> bool:
    state = _STATE
    found = state.kernels.get((lib_op, device_type))
    if found is None:
        key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"gptfast::{lib_op}", key)
        if state.loaded:
            state.kernels[(lib_op, device_type)] = found
    return found


def availability(device_type: str) -> str | None:
    """None if the native library is loaded (built on first call) and has kernels for the device."""
    state = _STATE
    if state.loaded and device_type in state.available:
        return state.available[device_type]
    reason = _availability(device_type)
    if state.loaded and state is _STATE:
        state.available[device_type] = reason
    return reason


def _availability(device_type: str) -> str | None:
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
