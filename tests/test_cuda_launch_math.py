"""CPU check of the CUDA kernels' launch arithmetic (csrc/cuda/launch.h), no GPU or CUDA runtime.

tests/cpp/cuda_launch_math.cpp includes launch.h in its pure-C++ mode and replays the index
mappings the kernels use for odd sizes (T in 1, 17, 65, 1023, 1025; N in 1, 80, 768, 1600, ...;
V = 50257): every row / key / column / element covered exactly once, legal grids and blocks,
shared memory within the 48 KB default, workspaces large enough. Its `--self-test` mode feeds
broken mappings to the same checkers and must catch all of them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "cpp" / "cuda_launch_math.cpp"
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) on PATH")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("launch_math") / "cuda_launch_math"
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'csrc' / 'cuda'}", str(DRIVER), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"compiling the launch-math driver failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return exe


def test_launch_math(driver):
    res = subprocess.run([str(driver)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"launch-math checks failed:\n{res.stdout[-6000:]}{res.stderr[-2000:]}"
    assert "all launch-math checks passed" in res.stdout


def test_checkers_catch_broken_mappings(driver):
    res = subprocess.run([str(driver), "--self-test"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"a broken mapping went undetected:\n{res.stdout}{res.stderr}"


def test_launch_header_is_pure_cpp():
    """launch.h must compile without CUDA headers in math-only mode (what the driver relies on),
    and the .cu files must not include torch headers (they would take ~80 s each to compile)."""
    text = (REPO / "csrc" / "cuda" / "launch.h").read_text()
    math_part = text.split("#ifndef GPTFAST_LAUNCH_MATH_ONLY")[0]
    assert "#include <cuda" not in math_part
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu*")):
        src = cu.read_text()
        for banned in ("torch/", "ATen/", "c10/"):
            assert f"#include <{banned}" not in src, f"{cu.name} includes a torch header ({banned})"
