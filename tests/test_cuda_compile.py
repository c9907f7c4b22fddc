"""CI compile check of the CUDA sources, no GPU needed.

Default run: every csrc/cuda/*.cu compiled with `nvcc -c` for sm_80 and sm_90 in one call per file
(`-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90`, the archs the build
ships by default: A100 and H100), plus `g++ -fsyntax-only` of csrc/cuda/bindings.cpp against the
torch wheel's headers, in parallel (2 workers), into tmp_path. attention.cu (36 kernel
instantiations: 3 dtypes x 4 head dims x 3 kernels) is most of the ~30 s this takes on 2 cores.

Flags: gptfast._build.nvcc_flags (exactly what the extension is built with) + the half / bfloat16
operator guards torch's build defines + warnings as errors (host: -Wall -Wextra -Werror; device:
-Werror all-warnings). Skipped, with the reason, only where nvcc is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gptfast import _build

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")

# What torch.utils.cpp_extension passes to nvcc: the kernels must not rely on implicit half casts.
TORCH_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
WERROR = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def _nvcc_cmd(src: Path, out: Path, archs: list[str]) -> list[str]:
    return [NVCC, "-c", *_build.nvcc_flags(archs), *TORCH_DEFINES, *WERROR, str(src), "-o", str(out)]


def _cuda_include() -> str | None:
    if NVCC is None:
        return None
    inc = Path(NVCC).resolve().parents[1] / "include"
    return str(inc) if (inc / "cuda_runtime_api.h").is_file() else None


def _bindings_cmd() -> list[str] | None:
    """g++ -fsyntax-only of bindings.cpp, or None if the torch wheel lacks the c10/cuda headers."""
    import torch

    inc = Path(torch.__file__).parent / "include"
    cuda_inc = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cuda_inc is None or cxx is None or not (inc / "c10" / "cuda" / "CUDAStream.h").is_file():
        return None
    isys = [inc, inc / "torch" / "csrc" / "api" / "include", cuda_inc, sysconfig.get_paths()["include"]]
    # A CPU wheel ships c10/cuda without the generated c10/cuda/impl/cuda_cmake_macros.h (it only
    # defines the shared-library export macro): the documented switch skips it.
    return [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            *[f for p in isys for f in ("-isystem", str(p))], f"-I{CUDA_DIR}", str(CUDA_DIR / "bindings.cpp")]


def _run(job: tuple[str, list[str]]) -> tuple[str, int, str, float]:
    name, cmd = job
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    return name, res.returncode, (res.stdout + res.stderr)[-6000:], time.perf_counter() - t0


def _compile_all(tmp: Path, archs: list[str], with_bindings: bool) -> dict[str, tuple[int, str, float, str]]:
    jobs = [(cu.name, _nvcc_cmd(cu, tmp / f"{cu.stem}.o", archs)) for cu in CU_FILES]
    # Longest first (attention.cu is most of the work), so the two workers finish together.
    jobs.sort(key=lambda j: j[0] != "attention.cu")
    if with_bindings:
        cmd = _bindings_cmd()
        if cmd is not None:
            jobs.append(("bindings.cpp", cmd))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, jobs))
    cmds = dict(jobs)
    out = {name: (rc, log, secs, " ".join(cmds[name])) for name, rc, log, secs in results}
    print("compile times:", ", ".join(f"{n} {v[2]:.1f}s" for n, v in out.items()), file=sys.stderr)
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    archs = _build.cuda_archs_default()
    return _compile_all(tmp_path_factory.mktemp("cuda_" + "_".join(f"sm{a}" for a in archs)), archs,
                        with_bindings=True)


def _assert_ok(results, name):
    rc, log, secs, cmd = results[name]
    assert rc == 0, f"{name} failed to compile ({secs:.1f}s):\n$ {cmd}\n{log}"


def test_cuda_sources_exist():
    names = {p.name for p in CU_FILES}
    want = {"attention.cu", "layer_norm.cu", "gelu_mlp.cu", "decode_attention.cu", "sampling.cu"}
    assert want <= names, f"missing CUDA sources: {sorted(want - names)}"
    assert (CUDA_DIR / "bindings.cpp").is_file() and (CUDA_DIR / "launch.h").is_file()


def test_default_archs_are_sm80_and_sm90():
    assert _build.cuda_archs_default() == ["80", "90"]


@needs_nvcc
@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
def test_cu_compiles_sm80_sm90(build, name):
    _assert_ok(build, name)


@needs_nvcc
def test_bindings_syntax(build):
    if "bindings.cpp" not in build:
        pytest.skip("the torch wheel ships no c10/cuda headers (or no CUDA include dir / g++): cannot syntax-check")
    _assert_ok(build, "bindings.cpp")


def test_nvcc_flags_follow_env(monkeypatch):
    monkeypatch.setenv("GPTFAST_CUDA_ARCHS", "80;90")
    flags = _build.nvcc_flags()
    assert flags[flags.index("-gencode") + 1] == "arch=compute_80,code=sm_80"
    assert "arch=compute_90,code=sm_90" in flags and "arch=compute_90,code=compute_90" in flags
    assert "--use_fast_math" not in flags and "-std=c++17" in flags
    monkeypatch.setenv("GPTFAST_CUDA_ARCHS", "86")
    assert "arch=compute_86,code=sm_86" in _build.nvcc_flags()
    monkeypatch.setenv("GPTFAST_CUDA_ARCHS", "sm_90")
    with pytest.raises(ValueError, match="GPTFAST_CUDA_ARCHS"):
        _build.nvcc_flags()
