"""The CUDA kernels (csrc/cuda) executed on the CPU, against fp64 references, under sanitizers and
shuffled schedules.

How: ``../shared/tools/cudashim`` (override: ``$GPTFAST_CUDASHIM``) runs CUDA C++ on the CPU with g++
(each CUDA thread a fiber; ``__syncthreads`` and warp collectives modelled with their masks; launch
limits enforced; dynamic shared memory starts as NaN). Its ``cu2cpp.py`` translates csrc/cuda into
tmp_path (two mechanical rewrites: ``<<<>>>`` launches and ``extern __shared__``); the drivers in
tests/cuda_cpu/ (one per .cu file, calling every host launcher of csrc/cuda/launch.h) are compiled
against that copy and compare every output with a reference in plain loops (tolerance rule in
tests/cuda_cpu/common.h: fp64 reference, 2x the fp32-arithmetic / dtype-rounding baseline + 1e-5).

Modes (issue #16): plain -O2 with the default schedule (``default`` shape set), the same binary under
``CUDASHIM_SCHEDULE=random:<seed>`` (``small`` shapes), ASan + UBSan (``small``), TSan (``tiny``).
The full shape sweep and the planted-bug check are ``slow``.

Builds are cached by a hash of everything that goes into them (translated sources, drivers, shim,
flags, compiler version) under ``$XDG_CACHE_HOME/gptfast/cudashim-<hash>`` (``~/.cache/gptfast``),
written to a temporary directory and renamed into place, so a second run only executes. The shim
and g++ are required: their absence fails the test (CI always has ../shared), it is not a skip.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
DRIVER_DIR = REPO / "tests" / "cuda_cpu"

# driver (tests/cuda_cpu/<name>.cpp) -> the translated kernel file it links with
DRIVERS = {
    "attention": "attention.cu",
    "layer_norm": "layer_norm.cu",
    "gelu": "gelu_mlp.cu",
    "decode_attention": "decode_attention.cu",
    "sample": "sampling.cu",
    "quant_linear": "quant_linear.cu",
}

FLAVORS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
SAN_ENV = {
    "asan": {"ASAN_OPTIONS": "detect_leaks=0:detect_stack_use_after_return=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"},
}
# mode -> (build flavor, shape level, extra environment)
MODES = {
    "plain": ("plain", "default", {}),
    "random": ("plain", "small", {"CUDASHIM_SCHEDULE": "random:7"}),
    "asan": ("asan", "small", {}),
    "tsan": ("tsan", "tiny", {}),
}
RUN_TIMEOUT = 600


def shim_dir() -> Path:
    env = os.environ.get("GPTFAST_CUDASHIM")
    return Path(env) if env else REPO.parent / "shared" / "tools" / "cudashim"


def _cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "gptfast"


def _cxx() -> str:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.fail("g++ not found on PATH: the CUDA-on-CPU tests (cudashim) need it")
    return cxx


def _require_shim() -> Path:
    d = shim_dir()
    if not (d / "cudashim.h").is_file() or not (d / "cu2cpp.py").is_file():
        pytest.fail(f"cudashim not found at {d} (expected cudashim.h and cu2cpp.py; set GPTFAST_CUDASHIM to "
                    "its folder): the CUDA kernels would go untested")
    return d


def translate(dst: Path, src: Path = CUDA_DIR) -> Path:
    """csrc/cuda -> dst via the shim's cu2cpp.py (line numbers kept)."""
    res = subprocess.run([sys.executable, str(_require_shim() / "cu2cpp.py"), str(src), str(dst)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"cu2cpp.py failed:\n{res.stdout}{res.stderr}"
    return dst


def _digest(gen: Path, flavors: list[str], drivers: list[str]) -> str:
    h = hashlib.sha256()
    cxx = _cxx()
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    shim = _require_shim()
    for root in (gen, DRIVER_DIR, shim, shim / "include"):
        for p in sorted(root.iterdir()):
            if p.is_file():
                h.update(f"{root.name}/{p.name}\0".encode())
                h.update(p.read_bytes())
    h.update(repr(sorted(flavors)).encode())
    h.update(repr(sorted(drivers)).encode())
    h.update(repr(FLAVORS).encode())
    return h.hexdigest()[:16]


def _sh(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    return res.returncode, (res.stdout + res.stderr)[-8000:], time.perf_counter() - t0


def build(gen: Path, flavors: list[str], drivers: list[str] | None = None, cache: bool = True,
          workers: int = 2) -> Path:
    """Build driver executables `<out>/<flavor>/<driver>` for each flavor; returns `out`.

    With `cache`, `out` is the cache directory of the inputs' hash and an existing complete build
    is reused; otherwise the build goes to `gen/../build`.
    """
    drivers = list(DRIVERS) if drivers is None else drivers
    cxx, shim = _cxx(), _require_shim()
    if cache:
        out = _cache_root() / f"cudashim-{_digest(gen, flavors, drivers)}"
        if (out / "COMPLETE").is_file():
            os.utime(out)  # most recently used: kept by _prune_cache
            return out
        _cache_root().mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=_cache_root()))
    else:
        out = work = gen.parent / "build"
        work.mkdir(parents=True, exist_ok=True)
    inc = ["-std=c++17", f"-I{shim / 'include'}", f"-I{gen}"]
    cus = sorted({DRIVERS[d] for d in drivers})
    objs = []  # (out, cmd)
    for fl in flavors:
        (work / fl).mkdir(exist_ok=True)
        for cu in cus:
            objs.append((work / fl / f"{cu}.o", [cxx, *inc, *FLAVORS[fl], "-x", "c++", "-c", str(gen / cu), "-o",
                                                 str(work / fl / f"{cu}.o")]))
        for d in drivers:
            objs.append((work / fl / f"{d}.drv.o", [cxx, *inc, *FLAVORS[fl], "-Wall", "-Wextra", "-Werror", "-c",
                                                    str(DRIVER_DIR / f"{d}.cpp"), "-o", str(work / fl / f"{d}.drv.o")]))
    # attention.cu (36 kernel instantiations) first, so the workers finish together
    objs.sort(key=lambda j: "attention.cu" not in str(j[0]))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda j: _sh(j[1]), objs))
    for (o, cmd), (rc, log, _) in zip(objs, results):
        assert rc == 0, f"compiling {o.name} failed:\n$ {' '.join(cmd)}\n{log}"
    for fl in flavors:
        for d in drivers:
            cmd = [cxx, *FLAVORS[fl], str(work / fl / f"{d}.drv.o"), str(work / fl / f"{DRIVERS[d]}.o"), "-o",
                   str(work / fl / d)]
            rc, log, _ = _sh(cmd)
            assert rc == 0, f"linking {d} ({fl}) failed:\n$ {' '.join(cmd)}\n{log}"
    if cache:
        for o in work.glob("*/*.o"):  # only the executables are reused
            o.unlink()
        (work / "COMPLETE").write_text("ok\n")
        try:
            os.replace(work, out)  # atomic publish; a concurrent run may have published first
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            if not (out / "COMPLETE").is_file():
                raise
        _prune_cache(keep=out)
    return out


def _prune_cache(keep: Path, n_keep: int = 2) -> None:
    """Remove our older builds (cudashim-<hash>, ~50 MB each) beyond the newest `n_keep`, and
    temporary build directories abandoned more than an hour ago. Touches nothing else."""
    root = _cache_root()
    done = [p for p in root.glob("cudashim-*") if re.fullmatch(r"cudashim-[0-9a-f]{16}", p.name) and p != keep]
    done.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    stale = [p for p in root.glob("cudashim-*.tmp*")
             if re.fullmatch(r"cudashim-[0-9a-f]{16}\.tmp\w+", p.name) and time.time() - p.stat().st_mtime > 3600]
    for p in done[n_keep - 1:] + stale:
        shutil.rmtree(p, ignore_errors=True)


def run_driver(exe: Path, level: str, env_extra: dict[str, str], timeout: int = RUN_TIMEOUT) -> tuple[bool, str]:
    env = dict(os.environ)
    env.pop("CUDASHIM_SCHEDULE", None)
    env.update(env_extra)
    try:
        res = subprocess.run([str(exe), level], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {timeout}s\n{(e.stdout or b'')[-3000:]!r}"
    out = res.stdout + res.stderr
    ok = res.returncode == 0 and re.search(r"\d+ checks passed, 0 failed", res.stdout) is not None
    return ok, out


def _failures(out: str) -> str:
    lines = out.splitlines()
    bad = [ln for ln in lines if not ln.startswith("PASS")]
    return "\n".join(bad[-60:])


# ---------------------------------------------------------------------------- default run


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Path:
    gen = translate(tmp_path_factory.mktemp("cudashim") / "gen")
    return build(gen, list(FLAVORS))


def test_shim_present():
    """CI always has ../shared: a missing shim is a failure, not a skip."""
    _require_shim()
    _cxx()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_kernels_on_cpu(builds, driver, mode):
    flavor, level, env = MODES[mode]
    env = {**SAN_ENV.get(flavor, {}), **env}
    ok, out = run_driver(builds / flavor / driver, level, env)
    assert ok, f"{driver} [{mode}: {flavor} build, {level} shapes, env {env}] failed:\n{_failures(out)}"


# ---------------------------------------------------------------------------- slow: full sweep


@pytest.mark.slow
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_kernels_on_cpu_full_sweep(builds, driver):
    ok, out = run_driver(builds / "plain" / driver, "full", {}, timeout=1800)
    assert ok, f"{driver} full sweep failed:\n{_failures(out)}"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2024"])
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_kernels_other_schedules(builds, driver, schedule):
    ok, out = run_driver(builds / "plain" / driver, "small", {"CUDASHIM_SCHEDULE": schedule})
    assert ok, f"{driver} under CUDASHIM_SCHEDULE={schedule} failed:\n{_failures(out)}"


# ---------------------------------------------------------------------------- slow: planted bugs
#
# Each plant is one textual change to the translated copy of a kernel file (line count kept, so shim
# reports still point at the right lines); the suite must catch it in at least one mode. The modes
# are the default run's (driver shape sets as above). Which mode caught which is printed (run with
# -s to see the table).

PLANTS = {
    # name: (file, driver, old text, new text[, which occurrence of old, 0-based])
    "barrier removed (attention fwd, after the K/V tile load)": (
        "attention.cu", "attention",
        "    __syncthreads();\n\n    // The tile is consumed", "    ;\n\n    // The tile is consumed"),
    "barrier removed (layer-norm dW/dB reduce, before lane sums)": (
        "layer_norm.cu", "layer_norm",
        "  sb[threadIdx.y][threadIdx.x] = b;\n  __syncthreads();", "  sb[threadIdx.y][threadIdx.x] = b;\n  ;"),
    "off-by-one loop bound (layer-norm fwd mean pass: i <= nvec)": (
        "layer_norm.cu", "layer_norm",
        "  float sum = 0.f, unused = 0.f;\n  for (int64_t i = threadIdx.x; i < nvec;",
        "  float sum = 0.f, unused = 0.f;\n  for (int64_t i = threadIdx.x; i <= nvec;"),
    "off-by-one loop bound (decode combine: s <= S)": (
        "decode_attention.cu", "decode_attention",
        "for (int s = 0; s < S; ++s) M = fmaxf", "for (int s = 0; s <= S; ++s) M = fmaxf"),
    "partial K/V tile loaded without its bounds check (attention fwd)": (
        "attention.cu", "attention",
        "      const bool ok = key < keys.end;\n      ks[idx]", "      const bool ok = true;\n      ks[idx]", 0),
    "causal mask shifted by one (attention fwd: key <= row + 1)": (
        "attention.cu", "attention",
        "sc[j] = (key <= row && key < keys.end)", "sc[j] = (key <= row + 1 && key < keys.end)"),
    "return before a block reduction (layer-norm fwd)": (
        "layer_norm.cu", "layer_norm",
        "  block_sum2(sum, unused, scratch);\n  const float mean",
        "  if (threadIdx.x * VEC >= N) return; block_sum2(sum, unused, scratch);\n  const float mean"),
    "decode split reads past cache_lens (tile load bound T_max instead of the length)": (
        "decode_attention.cu", "decode_attention",
        "      const bool ok = key < end;", "      const bool ok = key < T_max;"),
    "top-k boundary ties dropped (sampling: x > kth)": (
        "sampling.cu", "sample",
        "    if (x >= kth) z += double(expf(x - m));", "    if (x > kth) z += double(expf(x - m));"),
    "int4 high nibbles paired with the low half of x (quantized GEMV, 16-byte path)": (
        "quant_linear.cu", "quant_linear",
        "load_x16<T, true>(x + m * K + k + 16, xb);", "load_x16<T, true>(x + m * K + k + 0, xb);"),
    "group scale of the wrong group (quantized GEMV, int8 16-byte path: k / group + 1)": (
        "quant_linear.cu", "quant_linear",
        "const float s = sg != nullptr ? __half2float(sg[k / group]) : 1.f;",
        "const float s = sg != nullptr ? __half2float(sg[k / group + (k > 0)]) : 1.f;"),
    "a row chunk's last row dropped (quantized GEMV: m + 1 < rows)": (
        "quant_linear.cu", "quant_linear",
        "    if (m < rows && lane == m) Y[", "    if (m + 1 < rows && lane == m) Y["),
}


def plant(gen: Path, name: str) -> None:
    file, _, old, new, *which = PLANTS[name]
    p = gen / file
    text = p.read_text()
    if which:  # the anchor occurs more than once: plant at the given occurrence
        at = -1
        for _ in range(which[0] + 1):
            at = text.find(old, at + 1)
            assert at >= 0, f"plant {name!r}: occurrence {which[0]} of its anchor not found in {file}"
    else:
        assert text.count(old) == 1, f"plant {name!r}: its anchor text occurs {text.count(old)} times in {file}"
        at = text.find(old)
    assert old.count("\n") == new.count("\n")
    p.write_text(text[:at] + new + text[at + len(old):])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLANTS))
def test_planted_bug_is_caught(tmp_path, name):
    file, driver = PLANTS[name][:2]
    gen = translate(tmp_path / "gen")
    plant(gen, name)
    out = build(gen, list(FLAVORS), drivers=[driver], cache=False)
    caught = {}
    for mode, (flavor, level, env) in MODES.items():
        ok, log = run_driver(out / flavor / driver, level, {**SAN_ENV.get(flavor, {}), **env}, timeout=300)
        if not ok:
            lines = log.splitlines()
            # the most telling line: a sanitizer's verdict, a shim abort, a failed check
            first = next((ln for key in ("Sanitizer", "runtime error", "cudashim:", "FAIL") for ln in lines if key in ln),
                         lines[-1] if lines else "")
            caught[mode] = first[:200]
    print(f"\nPLANTED [{name}] caught by: {', '.join(caught) or 'NONE'}")
    for mode, first in caught.items():
        print(f"    {mode}: {first}")
    assert caught, f"planted bug {name!r} in {file} went undetected in every mode"
