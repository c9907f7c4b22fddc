"""`gptfast bench`: benchmarks of ops, generation and training (gptfast.bench runs them).

The flags are declared here; `gptfast.bench.main(args)` takes the parsed namespace."""

from __future__ import annotations

import argparse

from gptfast.bench.runner import BACKENDS, DTYPES, SUITES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: ops, generation, training",
        description="Time every backend against the reference and PyTorch; tables, JSON, CSV, plots.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gptfast import bench

    return bench.main(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default="ops", choices=SUITES,
                   help="ops (kernels), generate (tokens/s), train (ms/iter, loss), all, plot "
                        "(redraw the plots of a saved run, see --from), or quant-accuracy (perplexity, greedy "
                        "agreement and KL of the weight formats: gptfast.bench.quant_accuracy; not in 'all')")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated backends to compare (default: %(default)s)")
    p.add_argument("--out", default="bench_results", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats and peers (a smoke run, not for figures)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's current)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per backend (default: 20; 5 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="train suite: steps per backend (default: 100; 20 with --quick)")
    p.add_argument("--data", default=None,
                   help="train suite: a text file (default: $GPTFAST_SHAKESPEARE or Tiny Shakespeare "
                        "beside the source tree, else a synthetic text)")
    p.add_argument("--no-plot", action="store_true", help="do not draw PNG plots")
    p.add_argument("--from", dest="from_json", default=None, help="plot: the run JSON to plot")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
