"""pytest-benchmark suite of the hot ops, every backend, parametrized from `gptfast.bench.cases`.

    pytest benchmarks/bench_ops.py --benchmark-json=ops.json [--bench-quick] [--bench-device cuda]

Each backend is checked against the reference before it is timed (a wrong kernel fails the test
instead of producing a number); unavailable backends are skipped with the reason. FLOPs / bytes
per call are stored in `extra_info` (formulas: `gptfast.bench.cases`), so GB/s or FLOP/s can be
computed from the JSON as work / median time.
"""

from __future__ import annotations

import pytest
import torch

from gptfast.bench import cases as C
from gptfast.bench.runner import BACKENDS, DTYPES, unavailable
from gptfast.bench.timing import synced


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        if metafunc.function.__name__ == "test_attention_scaling":
            cs = C.scaling_cases("cuda" if torch.cuda.is_available() else "cpu",
                                 metafunc.config.getoption("--bench-quick"))
        else:
            cs = C.QUICK_OPS_CASES if metafunc.config.getoption("--bench-quick") else C.OPS_CASES
        metafunc.parametrize("case", cs, ids=[c.id.replace(" ", "-") for c in cs])


def _run(benchmark, case, backend, device, dtype_name, rounds):
    dtype = getattr(torch, DTYPES[dtype_name])
    inputs = C.build_inputs(case, dtype, device)
    reason = unavailable(backend, case.op, device, **C.dispatch_call(case, inputs))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    refs = C.reference_outputs(case, inputs)
    bad, err = C.check_backend(case, backend, inputs, refs, C.tolerance(case, inputs, refs))
    assert bad is None, f"{backend} {case.id}: MISMATCH: {bad}"
    flops, nbytes = case.work(dtype)
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape_str, backend=backend,
                                dtype=dtype_name, device=device, flops=flops, bytes=nbytes, max_rel_err=err)
    benchmark.pedantic(synced(C.make_call(case, backend, inputs), device), rounds=rounds, warmup_rounds=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op(benchmark, case, backend, bench_device, bench_dtype, bench_rounds):
    _run(benchmark, case, backend, bench_device, bench_dtype, bench_rounds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scaling(benchmark, case, backend, bench_device, bench_dtype, bench_rounds):
    """Causal attention fwd vs T (B1 H12 D64): the reference's O(T^2) memory vs fused kernels."""
    _run(benchmark, case, backend, bench_device, bench_dtype, bench_rounds)
