"""Timers and machine peaks for `gptfast bench`.

CPU: warm-up calls, then `repeats` timed calls with `time.perf_counter`; median and 20th / 80th
percentiles. CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls), median and
20th / 80th percentiles (the convention of Triton's tutorials and Liger-Kernel's tables).

All backends of one row are measured in the same loop, interleaved: repeat r times backend 1,
then backend 2, ..., then repeat r + 1. On a shared machine the noise comes in bursts (another
process's compile, a thermal step); timing backend A's twenty runs and then backend B's would put a
burst on one of them only and turn noise into a fake speedup. Round-robin spreads each burst over
all backends, so their ratios stay honest even when the absolute times wobble. The starting
backend also rotates per repeat, so none is always timed right after the same neighbour.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int  # number of timed calls (CUDA: do_bench samples)
    min_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Timing:
    return Timing(_quantile(times_ms, 0.5), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times_ms),
                  min(times_ms))


def synced(fn: Callable[[], object], device_type: str) -> Callable[[], object]:
    """fn followed by a device sync, for wall-clock timers (pytest-benchmark) on CUDA."""
    if device_type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def measure(fns: dict[str, Callable[[], object]], device_type: str, repeats: int = 20,
            warmup: int = 2) -> dict[str, Timing]:
    """Time every function of `fns` (name -> zero-argument callable), interleaved round-robin.

    CPU: `warmup` untimed calls each, then `repeats` timed rounds of one call per function.
    CUDA: `repeats` is turned into a few rounds of `do_bench` per function (each ~25 ms of
    samples), again round-robin; all samples of a function are pooled for the quantiles.
    """
    names = list(fns)
    if not names:
        return {}
    if device_type == "cuda":
        return _measure_cuda(fns, rounds=max(3, min(repeats // 4, 10)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            fns[n]()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: summarize(samples[n]) for n in names}


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median wall seconds of `repeats` calls of `fn()`, the last call's return value): for whole
    runs (a `generate()` call), where `measure`'s interleaving across backends does not apply."""
    import statistics

    ts, out = [], None
    for _ in range(max(1, int(repeats))):
        t0 = _clock()
        out = fn()
        ts.append(_clock() - t0)
    return statistics.median(ts), out


def _measure_cuda(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    from triton.testing import do_bench

    samples: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for n, fn in fns.items():
            try:  # triton >= 2.2: every sample
                got = do_bench(fn, warmup=10 if r else 25, rep=25, return_mode="all")
            except TypeError:  # older triton: only quantiles; pool the round's median
                got = [do_bench(fn, warmup=10 if r else 25, rep=25, quantiles=[0.5])]
            samples[n].extend(float(t) for t in (got if isinstance(got, (list, tuple)) else [got]))
    return {n: summarize(s) for n, s in samples.items()}


# --------------------------------------------------------------------------- machine peaks

READ_BW_MIN_BYTES = 1 << 30  # the streaming-read buffer: at least 1 GiB ...
READ_BW_LLC_FACTOR = 8  # ... and at least 8x the last-level cache


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache in bytes (Linux sysfs; None where it cannot be read)."""
    import glob

    best = None
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            txt = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        digits = txt.rstrip("KMG")
        if digits.isdigit():
            best = max(best or 0, int(digits) * mult)
    return best


def read_bw_buffer_bytes(device_type: str = "cpu") -> int:
    """The default streaming-read buffer: max(1 GiB, 8 x the last-level cache) on CPU, 1 GiB on GPUs."""
    llc = last_level_cache_bytes() if device_type == "cpu" else None
    return max(READ_BW_MIN_BYTES, READ_BW_LLC_FACTOR * (llc or 0))


# The streaming-read methods: name -> (what it runs, threads it uses: None = torch's). Each reads
# the whole buffer once, sequentially, and writes (almost) nothing, as a GEMV streams its weight.
READ_METHODS = {
    "sum": ("torch fp32 buf.sum()", None),
    "max_i32": ("torch int32 view .max()", None),
    "gemv": ("torch.mv of a (N, 4096) fp32 view by a vector (MKL sgemv: a GEMV's own read pattern)", None),
    "numpy": ("numpy np.add.reduce(buf), one thread", 1),
}
GEMV_K = 4096  # the GEMV view's row length (a GPT-2 MLP row is 3072; any length >> the vector width)
_clock = time.perf_counter  # the wall clock (tests replace it)


def _read_fns(buf: torch.Tensor, methods) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (a zero-argument call that reads `buf`, bytes it reads)."""
    out = {}
    for m in methods:
        if m == "sum":
            out[m] = (lambda: buf.sum(), buf.numel() * 4)
        elif m == "max_i32":
            out[m] = (lambda: buf.view(torch.int32).max(), buf.numel() * 4)
        elif m == "gemv":
            rows = buf.numel() // GEMV_K
            a = buf[: rows * GEMV_K].view(rows, GEMV_K)
            x = torch.ones(GEMV_K, device=buf.device)
            y = torch.empty(rows, device=buf.device)
            out[m] = (lambda: torch.mv(a, x, out=y), rows * GEMV_K * 4)
        elif m == "numpy":
            import numpy as np

            arr = buf.numpy()
            out[m] = (lambda: np.add.reduce(arr), buf.numel() * 4)
    return out


def bandwidth_stats(samples: list[float]) -> dict:
    """best / min / median / max GB/s of one method's samples and its spread, 100 * (max - min) /
    max (how far the slowest sample fell below the best)."""
    import statistics

    best = max(samples)
    return dict(best_gbps=best, min_gbps=min(samples), median_gbps=statistics.median(samples), max_gbps=best,
                spread_pct=100.0 * (best - min(samples)) / best, samples=list(samples))


def measure_read_bandwidth(device_type: str = "cpu", nbytes: int | None = None, repeats: int = 7,
                           methods=None) -> dict:
    """The machine's read bandwidth as memory-bound engines are judged: a streaming read of a
    buffer far larger than the caches, by the threads the benchmark runs with, by several methods,
    the fastest taken (see docs/PERF.md#read-bandwidth).

    Method: one fp32 buffer of max(1 GiB, 8 x last-level cache) bytes (`nbytes` overrides; GPUs: 1
    GiB), filled with ones (every page touched beforehand), read by every method of `methods`
    (default: all of READ_METHODS on CPU, "sum" on GPUs): one untimed call each, then `repeats`
    rounds of one timed call per method, interleaved (the starting method rotates per round), so a
    burst of a neighbour's load hits all methods alike. GB/s = bytes the call reads / its time
    (1e9 bytes/s). A method can only under-read the machine (a bound that a kernel beats is too
    low), so the result is the best sample of the fastest method.

    Returns {gbps (the bound's bandwidth), method (a sentence: which method, buffer, threads,
    repeats), best_method, min_gbps / median_gbps / max_gbps / spread_pct / samples (of the best
    method), methods: {name: the same stats + what + threads}, buffer_mib, threads}.
    """
    dev = torch.device(device_type)
    nbytes = int(read_bw_buffer_bytes(device_type) if nbytes is None else nbytes) // 4 * 4
    if nbytes <= 0 or repeats < 1:
        raise ValueError(f"measure_read_bandwidth: nbytes and repeats must be positive, got {nbytes}, {repeats}")
    if methods is None:
        methods = tuple(READ_METHODS) if device_type == "cpu" else ("sum",)
    methods = tuple(methods)
    bad = [m for m in methods if m not in READ_METHODS or (device_type != "cpu" and m != "sum")]
    if not methods or bad:
        raise ValueError(f"measure_read_bandwidth: methods must be a non-empty subset of {tuple(READ_METHODS)} "
                         f"(GPUs: ('sum',)), got {methods}")
    threads = torch.get_num_threads()
    buf = torch.ones(nbytes // 4, device=dev)
    fns = _read_fns(buf, methods)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for fn, _ in fns.values():
        fn()
    sync()
    inner = 10 if device_type == "cuda" else 1  # a GPU read of 1 GiB takes ~0.3 ms: amortise the sync
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            fn, nb = fns[m]
            t0 = _clock()
            for _ in range(inner):
                fn()
            sync()
            samples[m].append(inner * nb / (_clock() - t0) / 1e9)
    del fns, buf
    per = {m: dict(bandwidth_stats(samples[m]), what=READ_METHODS[m][0], threads=READ_METHODS[m][1] or threads)
           for m in methods}
    best = max(methods, key=lambda m: per[m]["best_gbps"])
    b = per[best]
    return dict(gbps=b["best_gbps"], best_method=best, min_gbps=b["min_gbps"], median_gbps=b["median_gbps"],
                max_gbps=b["max_gbps"], spread_pct=b["spread_pct"], samples=b["samples"], methods=per,
                buffer_mib=nbytes / 2**20, threads=threads,
                method=(f"streaming read of {nbytes / 2**30:.2f} GiB, fastest of {len(methods)} methods "
                        f"({', '.join(methods)}): {best} ({b['what']}), {per[best]['threads']} thread(s), "
                        f"best of {repeats}"))


# Datasheet peaks (dense, no sparsity) for the roofline column on GPUs we know; matched by name.
# H100 SXM5: 989 TFLOP/s bf16, 3.35 TB/s HBM3 (NVIDIA H100 datasheet). H100 PCIe: 756, 2.0.
# H200: 989, 4.8. A100 SXM 80GB: 312, 2.039.
DATASHEET = [
    ("H200", dict(name="H200", tflops_bf16=989.0, tbps=4.8)),
    ("H100 PCIe", dict(name="H100 PCIe", tflops_bf16=756.0, tbps=2.0)),
    ("H100", dict(name="H100 SXM", tflops_bf16=989.0, tbps=3.35)),
    ("A100", dict(name="A100 SXM", tflops_bf16=312.0, tbps=2.039)),
]


def datasheet_peaks(gpu_name: str | None) -> dict | None:
    if not gpu_name:
        return None
    for key, peaks in DATASHEET:
        if key in gpu_name:
            return dict(peaks)
    return None


def measure_peaks(device_type: str, quick: bool = False, repeats: int = 5) -> dict:
    """Measured memory bandwidth and matmul throughput of this machine, in this run.

    copy_gbps: `dst.copy_(src)` of a large fp32 buffer, bytes read + written / t.
    read_gbps: `measure_read_bandwidth` (the fastest of several streaming reads, best of `repeats`;
    its default buffer, 64 MiB with `quick`), bytes read / t (read-only streams are what decode and
    sampling do); read_method says which.
    matmul_gflops: 2 * n^3 / t for an n x n matmul (n = 2048 fp32 on CPU; 8192 bf16 on GPU).
    bw_gbps: the larger of the two bandwidths, the roofline's memory ceiling.
    A peak is what the machine can do, so each uses the fastest of its runs (not the median):
    on a shared machine the median would understate it and inflate every row's % of peak.
    """
    dev = torch.device(device_type)
    if device_type == "cuda":
        nbytes = 1 << 30
        n, mm_dtype = 8192, torch.bfloat16
    else:
        nbytes = (64 if quick else 256) << 20
        n, mm_dtype = 2048, torch.float32
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=dev).to(mm_dtype)
    b = torch.randn(n, n, device=dev).to(mm_dtype)
    t = measure({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ b}, device_type, repeats=repeats, warmup=1)
    copy_gbps = 2 * nbytes / (t["copy"].min_ms * 1e-3) / 1e9
    del src, dst
    read = measure_read_bandwidth(device_type, nbytes=(64 << 20) if quick and device_type == "cpu" else None,
                                  repeats=repeats)
    read_gbps = read["gbps"]
    peaks = dict(
        copy_gbps=copy_gbps,
        read_gbps=read_gbps,
        read_method=read["method"],
        bw_gbps=max(copy_gbps, read_gbps),
        matmul_gflops=2.0 * n**3 / (t["matmul"].min_ms * 1e-3) / 1e9,
        matmul_shape=f"{n}^3 {str(mm_dtype).replace('torch.', '')}",
        buffer_mib=nbytes >> 20,
    )
    del a, b
    if device_type == "cuda":
        torch.cuda.empty_cache()
        sheet = datasheet_peaks(torch.cuda.get_device_name())
        if sheet is not None:
            peaks["datasheet"] = sheet
    return peaks
