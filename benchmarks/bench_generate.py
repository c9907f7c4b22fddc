"""pytest-benchmark wrapper of the generation benchmark (`gptfast.bench_generate.benchmark_generate`).
Its rows (tokens/s vs Hugging Face generate, the bandwidth bound) are stored in `extra_info`.
"""

from __future__ import annotations

import inspect


from gptfast.bench.runner import find_benchmark_generate


def test_generate(benchmark, bench_device, bench_dtype, request):
    fn = find_benchmark_generate()
    offered = dict(device=bench_device, dtype=bench_dtype, quick=request.config.getoption("--bench-quick"))
    params = inspect.signature(fn).parameters
    kwargs = offered if any(p.kind is p.VAR_KEYWORD for p in params.values()) else {
        k: v for k, v in offered.items() if k in params}
    rows = benchmark.pedantic(lambda: fn(**kwargs), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [dict(r) for r in rows or []]
    assert rows, "benchmark_generate returned no rows"
