"""Benchmarks of gptfast: ops (every backend vs the reference and PyTorch), generation, training.

    gptfast bench [ops|generate|train|all|plot] --device cpu|cuda --dtype fp32|fp16|bf16 \
        --backends reference,torch,native,triton --out DIR [--quick] [--threads N] [--repeats N]

Modules: `cases` (the shared case table and work formulas, also used by `benchmarks/`),
`timing` (interleaved timers, machine peaks), `records` (rows, table, history files),
`runner` (suites, CLI entry), `plots` (PNG plots drawn from a saved run's JSON).
Importing this package is cheap (no torch): the CLI parser imports it on every command.
"""

from gptfast.bench.runner import SUITES, main

__all__ = ["SUITES", "main"]
