"""Side-by-side CPU timings of the native attention kernels vs PyTorch, in one process.

    nice -n 10 python benchmarks/bench_native_attention.py [--threads 2] [--reps 20]

Each line: median (p20, p80) in ms of `runs` timed calls after warm-up, for every backend, and
the ratio baseline / native (> 1 = native faster). Baselines: `torch` (F.scaled_dot_product_attention,
is_causal=True for attention; with a boolean mask for decode) and `reference` (attention only).
FLOP/s counts the causal half: fwd 2 * 2 * B * H * D * T (T + 1) / 2 (QK^T and PV), fwd+bwd 3.5x that.
The machine is shared: compare ratios, not absolute numbers, and repeat.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gptfast import ops


def bench(fn, reps: int, warmup: int = 3) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))] * 1e3  # noqa: E731
    return statistics.median(ts) * 1e3, q(0.2), q(0.8)


def attention_cases(reps: int) -> None:
    for shape in [(1, 12, 1024, 64), (8, 12, 256, 64)]:
        B, H, T, D = shape
        flops = 2 * 2 * B * H * D * T * (T + 1) / 2
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        dout = torch.randn(*shape, generator=g)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        res = {}
        for backend in ("native", "torch", "reference"):
            fwd = lambda: ops.causal_attention(q, k, v, backend=backend)  # noqa: E731

            def fwd_bwd():
                out = ops.causal_attention(*leaves, backend=backend)
                torch.autograd.grad(out, leaves, dout)

            with torch.no_grad():
                res[(backend, "fwd")] = bench(fwd, reps if backend != "reference" else max(5, reps // 4))
            res[(backend, "fwd+bwd")] = bench(fwd_bwd, reps if backend != "reference" else max(5, reps // 4))
        for kind, fl in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
            nat = res[("native", kind)][0]
            cells = [
                f"{b} {res[(b, kind)][0]:.2f} ({res[(b, kind)][1]:.2f}, {res[(b, kind)][2]:.2f}) ms"
                for b in ("native", "torch", "reference")
            ]
            print(
                f"attention {kind:8s} {shape}: " + " | ".join(cells)
                + f" | native {fl / nat / 1e6:.1f} GFLOP/s | torch/native {res[('torch', kind)][0] / nat:.2f}x"
                + f" | reference/native {res[('reference', kind)][0] / nat:.2f}x"
            )


def decode_cases(reps: int) -> None:
    for B in (1, 8):
        H, T_max, D = 12, 1024, 64
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, 1, D, generator=g)
        kc, vc = (torch.randn(B, H, T_max, D, generator=g) for _ in range(2))
        lens = torch.full((B,), T_max, dtype=torch.int64)
        res = {b: bench(lambda: ops.decode_attention(q, kc, vc, lens, backend=b), reps * 5) for b in ("native", "torch")}
        gbs = 2 * B * H * T_max * D * 4 / (res["native"][0] * 1e-3) / 1e9  # k and v read once
        print(
            f"decode (B={B}, H={H}, T_max={T_max}, D={D}): native {res['native'][0]:.3f} ms ({gbs:.1f} GB/s) | "
            f"torch {res['torch'][0]:.3f} ms | torch/native {res['torch'][0] / res['native'][0]:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", choices=("attention", "decode"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    if args.only in (None, "attention"):
        attention_cases(args.reps)
    if args.only in (None, "decode"):
        decode_cases(args.reps)


if __name__ == "__main__":
    main()
