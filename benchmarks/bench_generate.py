"""pytest-benchmark wrapper of the generation benchmark (`benchmark_generate` in gptfast.engine
or gptfast.bench_generate, written by the generation work). Its rows (tokens/s vs Hugging Face
generate, the bandwidth bound) are stored in `extra_info`; skipped with the reason until it exists.
"""

from __future__ import annotations

import inspect

import pytest

from gptfast.bench.runner import find_benchmark_generate


def test_generate(benchmark, bench_device, bench_dtype, request):
    fn, reason = find_benchmark_generate()
    if fn is None:
        pytest.skip(f"not available: {reason}")
    offered = dict(device=bench_device, dtype=bench_dtype, quick=request.config.getoption("--bench-quick"))
    params = inspect.signature(fn).parameters
    kwargs = offered if any(p.kind is p.VAR_KEYWORD for p in params.values()) else {
        k: v for k, v in offered.items() if k in params}
    rows = benchmark.pedantic(lambda: fn(**kwargs), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [dict(r) for r in rows or []]
    assert rows, "benchmark_generate returned no rows"
