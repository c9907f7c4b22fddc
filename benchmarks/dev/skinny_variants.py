"""Numbered variants of the CPU skinny linear (benchmarks/dev/skinny_variants.cpp), llm.c dev/cuda
style: each variant is checked against an fp64 reference, then timed interleaved against variant 0
(the previous product kernel) on GPT-2 124M decode shapes; GB/s = weight bytes streamed / time.

Each timed call reads a different copy of the weight (a pool > 2x the L3), so every call streams
from DRAM as in real decoding (one pass over all layers' weights per token), not from the cache.

    python benchmarks/dev/skinny_variants.py [--threads 2] [--repeats 25] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# (name, variant id, weight rows per tile, x rows per tile, prefetch distance in rows)
# 'product' (gptfast's op as built, for the final comparison) is also accepted.
VARIANTS = {
    "v0": (0, 4, 2, 16),
    "v1 4x1 pf16": (1, 4, 1, 16),
    "v1 8x1 pf16": (1, 8, 1, 16),
    "v1 8x1 pf32": (1, 8, 1, 32),
    "v1 4x2 pf16": (1, 4, 2, 16),
    "v1 4x4 pf16": (1, 4, 4, 16),
    "v1 2x8 pf16": (1, 2, 8, 16),
    "v1 3x8 pf16": (1, 3, 8, 16),
    "v1 4x6 pf16": (1, 4, 6, 16),
    "v1 6x4 pf16": (1, 6, 4, 16),
    "v1 8x2 pf16": (1, 8, 2, 16),
}
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]  # (K, N)
MS = [1, 2, 4, 8, 16]


def call(ext, name, x, w, b, out):
    """One call of variant `name` into out; 'product' is gptfast's op (torch.ops.gptfast.skinny_linear)."""
    if name == "product":
        out.copy_(torch.ops.gptfast.skinny_linear(x, w, b))
        return
    v, nr, mb, pf = spec(name)
    ext.run(v, x, w, b, out, nr, mb, pf)


def spec(name):
    """'v0', or 'v<id> <NR>x<MB> pf<rows>' (any instantiated NR x MB, see run_v1 in the .cpp)."""
    if name in VARIANTS:
        return VARIANTS[name]
    v, tile, pf = name.split()
    nr, mb = tile.split("x")
    return int(v[1:]), int(nr), int(mb), int(pf[2:])


def build():
    from torch.utils.cpp_extension import load

    return load(name="skinny_variants", sources=[str(ROOT / "benchmarks/dev/skinny_variants.cpp")],
                extra_include_paths=[str(ROOT / "csrc/cpu")],
                extra_cflags=["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"], extra_ldflags=["-fopenmp"])


def check(ext, names):
    """Every variant against fp64 over odd shapes (tile, K-tail and N-tail remainders)."""
    g = torch.Generator().manual_seed(0)
    v5_err = [0.0, 0.0]
    for K, N in [(67, 131), (768, 2304), (5, 3), (1, 9), (40, 6), (3072, 37), (33, 17)]:
        for M in [1, 2, 3, 5, 7, 8, 13, 16, 17]:
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g) / K**0.5
            b = torch.randn(N, generator=g)
            for wd in (torch.float32, torch.bfloat16):
                ww = w.to(wd).contiguous()
                ref = x.double() @ ww.double().t() + b.double()
                tol = 1e-5 * ((x.double().abs() @ ww.double().abs().t()).max().item() + 1.0)
                for name in names:
                    out = torch.empty(M, N)
                    call(ext, name, x, ww, b, out)
                    r, t = ref, tol
                    if name.startswith("v5") and wd == torch.bfloat16:
                        # vdpbf16ps: exact for x rounded to bf16; its error against the true x is
                        # recorded (accuracy of a possible opt-in), not checked here.
                        xr = x.bfloat16().double()
                        r = xr @ ww.double().t() + b.double()
                        t = 1e-5 * ((xr.abs() @ ww.double().abs().t()).max().item() + 1.0)
                        scale = (x.double().abs() @ ww.double().abs().t()).max().item()
                        v5_err[0] = max(v5_err[0], (out.double() - ref).abs().max().item() / scale)
                        v5_err[1] = max(v5_err[1], (out.double() - r).abs().max().item() / scale)
                    err = (out.double() - r).abs().max().item()
                    if not err <= t:
                        raise SystemExit(f"{name} WRONG: M={M} K={K} N={N} {wd}: max err {err:.3g} > {t:.3g}")
    print(f"correctness: {len(names)} variants match fp64 (fp32 and bf16 weights)")
    if any(n.startswith("v5") for n in names):
        print(f"v5 (x rounded to bf16): max |error| / max sum|x w| vs the fp32-x reference {v5_err[0]:.2e}, "
              f"vs the bf16-rounded-x reference {v5_err[1]:.2e}")


def time_config(ext, names, M, K, N, wd, repeats):
    esize = 4 if wd == torch.float32 else 2
    wbytes = N * K * esize
    copies = max(2, -(-96 * 2**20 // wbytes))  # > 2x the 32 MiB L3 in all
    pool = [(torch.randn(N, K) / K**0.5).to(wd) for _ in range(copies)]
    x = torch.randn(M, K)
    b = torch.randn(N)
    out = torch.empty(M, N)
    calls = max(1, min(copies, 8))
    samples = {n: [] for n in names}
    i = 0
    for rep in range(repeats + 1):
        for name in names:
            f = (lambda w: torch.ops.gptfast.skinny_linear(x, w, b)) if name == "product" else None
            v, nr, mb, pf = spec(name) if f is None else (0, 0, 0, 0)
            t0 = time.perf_counter()
            for _ in range(calls):
                if f is None:
                    ext.run(v, x, pool[i % copies], b, out, nr, mb, pf)
                else:
                    f(pool[i % copies])
                i += 1
            dt = (time.perf_counter() - t0) / calls
            if rep:
                samples[name].append(dt)
    return wbytes, {n: statistics.median(s) for n, s in samples.items()}, {n: min(s) for n, s in samples.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--shapes", default="all", help="'all' or 'head' or 'mlp' ...")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    ext = build()
    if "product" in names:
        from gptfast.ops import native

        native.load_extension()
    check(ext, names)
    from gptfast.bench.timing import measure_read_bandwidth

    print("uptime:", os.popen("uptime").read().strip())
    bw0 = measure_read_bandwidth("cpu", repeats=5)
    print(f"read bandwidth (start): best {bw0['gbps']:.1f} GB/s, median {bw0['median_gbps']:.1f}, min {bw0['min_gbps']:.1f}")
    shapes = SHAPES if a.shapes == "all" else [s for s in SHAPES if (a.shapes == "head") == (s[1] == 50257)]
    ms = [int(m) for m in a.ms.split(",")]
    for dname in a.dtypes.split(","):
        wd = torch.float32 if dname == "fp32" else torch.bfloat16
        for M in ms:
            tot = {n: 0.0 for n in names}
            totb = {n: 0.0 for n in names}
            totbytes = 0
            for K, N in shapes:
                wbytes, med, best = time_config(ext, names, M, K, N, wd, a.repeats)
                totbytes += wbytes
                row = "  ".join(f"{n}: {wbytes / med[n] / 1e9:5.1f} GB/s x{med[names[0]] / med[n]:.2f}" for n in names)
                print(f"{dname} M={M:2d} ({K},{N}) median: {row}", flush=True)
                row = "  ".join(f"{n}: {wbytes / best[n] / 1e9:5.1f} GB/s x{best[names[0]] / best[n]:.2f}" for n in names)
                print(f"{dname} M={M:2d} ({K},{N}) best:   {row}", flush=True)
                for n in names:
                    tot[n] += med[n]
                    totb[n] += best[n]
            row = "  ".join(f"{n}: {totbytes / tot[n] / 1e9:5.1f} GB/s x{tot[names[0]] / tot[n]:.2f}" for n in names)
            print(f"== {dname} M={M:2d} all shapes, sum of medians: {row}", flush=True)
            row = "  ".join(f"{n}: {totbytes / totb[n] / 1e9:5.1f} GB/s x{totb[names[0]] / totb[n]:.2f}" for n in names)
            print(f"== {dname} M={M:2d} all shapes, sum of bests:   {row}", flush=True)
    bw1 = measure_read_bandwidth("cpu", repeats=5)
    print(f"read bandwidth (end): best {bw1['gbps']:.1f} GB/s, median {bw1['median_gbps']:.1f}, min {bw1['min_gbps']:.1f}")
    print("uptime:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
