"""Benchmarks of gptfast: ops (every backend vs the reference and PyTorch), generation, training.

    gptfast bench [ops|generate|train|all|plot] --device cpu|cuda --dtype fp32|fp16|bf16 \
        --backends reference,torch,native,triton --out DIR [--quick] [--threads N] [--repeats N]

Modules: `cases` (the shared case table and the work formulas: the one attention-FLOP formula),
`timing` (the timing harness: interleaved timers, the read bandwidth, machine peaks), `records`
(rows, table, history files), `runner` (suites, CLI entry), `generate` (the generation suite:
decoding vs Hugging Face and the peers against the bandwidth bound, the prompt pass), `peers`
(Hugging Face, CTranslate2, llama.cpp runners), `load` (other processes' CPU use), `plots` (PNG
plots drawn from a saved run's JSON), `triton_gpu` (Triton vs torch on a GPU: `python -m
gptfast.bench.triton_gpu`). `benchmarks/` holds thin pytest-benchmark wrappers of these.
How the numbers are taken and what they showed: docs/PERF.md.
Importing this package is cheap (no torch): the CLI parser imports it on every command.
"""

from gptfast.bench.runner import SUITES, main

__all__ = ["SUITES", "main"]
