"""pytest-benchmark wrapper of the generation benchmark (`gptfast.bench.generate.benchmark_generate`).
Its rows (tokens/s vs Hugging Face and the peers, the bandwidth bound, the prompt pass) are stored
in `extra_info`; the timing is `gptfast.bench`'s, pytest-benchmark only records the whole run.
"""

from __future__ import annotations

from gptfast.bench.generate import benchmark_generate


def test_generate(benchmark, bench_device, bench_dtype, request):
    quick = request.config.getoption("--bench-quick")
    rows = benchmark.pedantic(lambda: benchmark_generate(device=bench_device, dtype=bench_dtype, quick=quick),
                              rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [dict(r) for r in rows]
    assert rows, "benchmark_generate returned no rows"
