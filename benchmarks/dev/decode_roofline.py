"""Where a decoding step's time goes, per weight format and batch size: the measured explanation of
the targets of issues #18 / #20 that the benchmark misses. This VM exposes no hardware counters
(`perf stat -e cycles` says <not supported>), so the explanation is a roofline built from
measurements on the same machine, in one run:

- the two ceilings: the read bandwidth (gptfast.bench.timing.measure_read_bandwidth: 1 GiB,
  fastest of 4 methods, best of 9) and the compute peak that an optimised library reaches (MKL
  sgemm 2048^3 fp32; oneDNN bf16 x bf16 GEMM);
- each format's GEMV/GEMM kernel alone, on one 1 GiB weight matrix (DRAM-resident: the rate at which
  the kernel itself can stream, M = 1) and on GPT-2 124M's own matrices in a step's order (M = 1,
  8, 16; the model's 12 x 4 matrices + the head, ~0.1-0.5 GB: also DRAM-resident);
- the whole decoding step (gptfast.generate, fused native step, 16-token prompts, 64 new tokens)
  split into those matrices' time and the rest (attention over the KV cache, LayerNorms, GELU,
  embeddings, sampling, the Python loop).

Run: `python benchmarks/dev/decode_roofline.py` on a quiet machine (2 threads); output:
benchmarks/results/cpu/decode_roofline.txt."""
import copy
import os
import subprocess
import time

import torch

import gptfast
from gptfast import GPT, GPTConfig
from gptfast.bench import timing
from gptfast.ops import native

torch.set_num_threads(2)
native.ensure_loaded()
torch.manual_seed(0)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"{cpu}, {os.cpu_count()} cores, 2 threads, torch {torch.__version__}, git {sha}; load {os.getloadavg()[0]:.2f}")


def best_s(f, n=7):
    f()
    b = float("inf")
    for _ in range(n):
        s = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - s)
    return b


bw = timing.measure_read_bandwidth("cpu", repeats=9)
BW = bw["gbps"]
print(f"read bandwidth: {BW:.1f} GB/s ({bw['best_method']}; min {bw['min_gbps']:.1f}, median "
      f"{bw['median_gbps']:.1f}, spread {bw['spread_pct']:.0f} %)")
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
PEAK32 = 2 * 2048**3 / best_s(lambda: a @ b, 5) / 1e9
ab, bb = a.bfloat16(), b.bfloat16()
PEAK16 = 2 * 2048**3 / best_s(lambda: ab @ bb, 5) / 1e9
print(f"compute peaks reached by libraries: MKL sgemm 2048^3 {PEAK32:.0f} GFLOP/s; oneDNN bf16 GEMM {PEAK16:.0f} GFLOP/s")

FORMATS = ["fp32", "bf16", "int8", "int8-g32", "int4-g32"]
base = GPT(GPTConfig(), backend="native").eval()


def in_format(fmt):
    return base if fmt == "fp32" else gptfast.quantize(copy.deepcopy(base), fmt)


def matrices(m):
    """(module, input width) of every matrix, in a step's order."""
    out = []
    for blk in m.transformer.h:
        out += [(blk.attn.c_attn, 768), (blk.attn.c_proj, 768), (blk.mlp.c_fc, 768), (blk.mlp.c_proj, 3072)]
    return out + [(m.lm_head, 768)]


PARAMS = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257  # multiply-adds per row


def nbytes(mod):
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


def local_bw():
    return timing.measure_read_bandwidth("cpu", repeats=3)["gbps"]


BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1, "int8-g32": 34 / 32, "int4-g32": 18 / 32}
print("\n1. each format's kernel streaming one ~1 GiB matrix (K = 768), M = 1, best of 5; the read bandwidth\n"
      "   measured just before and after it (best of 3 each; this VM's bandwidth drifts between ~34 and ~60 GB/s)")
for fmt in FORMATS:
    V = int((1 << 30) / (768 * BYTES_PER_WEIGHT[fmt]))
    big = GPT(GPTConfig(n_layer=1, n_embd=768, n_head=12, vocab_size=V), backend="native").eval()
    head = big.lm_head if fmt == "fp32" else gptfast.quantize(big, fmt).lm_head
    x = torch.randn(1, 1, 768)
    before = local_bw()
    with torch.inference_mode():
        t = best_s(lambda: head(x), 5)
    after = local_bw()
    rate = nbytes(head) / t / 1e9
    print(f"  {fmt:9s} {nbytes(head) / 2**20:7.0f} MiB: {rate:5.1f} GB/s; read bandwidth {before:.1f} / {after:.1f} GB/s: "
          f"{100 * rate / max(before, after):4.0f} % of the higher")
    del big, head

print("\n2. GPT-2 124M's matrices in a step's order (12 x 4 + head), then the whole decoding step")
print("   %bw: of the higher of two read-bandwidth readings taken just before and after the row; %peak: of MKL sgemm's")
print("   fmt       B  matrices: MB    ms   GB/s %bw  GFLOP/s %peak | step ms  rest ms (rest %) | tok/s   local bw")
prompt_len, new = 16, 64
for fmt in FORMATS:
    m = in_format(fmt)
    mats = matrices(m)
    wbytes = sum(nbytes(mod) for mod, _ in mats)
    for B in (1, 8, 16):
        xs = {768: torch.randn(B, 1, 768), 3072: torch.randn(B, 1, 3072)}

        def all_mats():
            for mod, k in mats:
                mod(xs[k])

        before = local_bw()
        with torch.inference_mode():
            tm = best_s(all_mats, 5)
        prompt = torch.randint(0, 50257, (B, prompt_len))
        gptfast.generate(m, prompt, 4, temperature=0.0)
        st_best = None
        for _ in range(3):
            st = {}
            gptfast.generate(m, prompt, new, temperature=0.0, stats=st)
            step = st["decode_s"] / st["steps"]
            st_best = step if st_best is None else min(st_best, step)
        after = local_bw()
        BWl = max(before, after)
        peak = PEAK32
        gf = 2 * B * PARAMS / tm / 1e9
        print(f"   {fmt:9s} {B:2d} {wbytes / 1e6:8.0f} {tm * 1e3:6.2f} {wbytes / tm / 1e9:6.1f} {100 * wbytes / tm / 1e9 / BWl:3.0f} "
              f"{gf:8.0f} {100 * gf / peak:4.0f}  | {st_best * 1e3:7.2f} {1e3 * (st_best - tm):7.2f} ({100 * (st_best - tm) / st_best:3.0f} %)"
              f" | {B / st_best:6.1f}   {before:.1f}/{after:.1f}")
    if m is not base:
        del m

bw2 = timing.measure_read_bandwidth("cpu", repeats=9)
print(f"\nread bandwidth at the end: {bw2['gbps']:.1f} GB/s (start {BW:.1f}; this VM's bandwidth drifts, see the README)")
