"""pytest-benchmark suites of gptfast (not part of the default test run: pytest.ini's testpaths
is `tests`). Run them explicitly:

    pytest benchmarks/ --benchmark-json=bench.json                      # CPU, fp32, full shapes
    pytest benchmarks/ --bench-quick --benchmark-json=bench.json        # small shapes
    pytest benchmarks/ --bench-device cuda --bench-dtype bf16 --benchmark-json=bench.json

The cases come from `gptfast.bench.cases`, the same table `gptfast bench` uses. Files are named
`bench_<op>.py` (Liger-Kernel's layout); this conftest makes pytest collect them.
"""

from __future__ import annotations

import os

import pytest

# As in tests/conftest.py: without CUDA, Triton kernels can only run in the interpreter, which must
# be chosen before triton is first imported. (The benchmarks skip Triton on CPU anyway.)
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    g = parser.getgroup("gptfast benchmarks")
    g.addoption("--bench-device", default=None, choices=["cpu", "cuda"],
                help="device (default: cuda if available, else cpu)")
    g.addoption("--bench-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                help="dtype (default: fp32 on cpu, bf16 on cuda)")
    g.addoption("--bench-quick", action="store_true", help="the --quick case list (small shapes)")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default 20; 5 quick)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    import torch

    dev = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device here")
    return dev


@pytest.fixture(scope="session")
def bench_dtype(request, bench_device) -> str:
    return request.config.getoption("--bench-dtype") or ("bf16" if bench_device == "cuda" else "fp32")


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    r = request.config.getoption("--bench-rounds")
    return r if r is not None else (5 if request.config.getoption("--bench-quick") else 20)

