"""The named option GPTFAST_BF16_DOT=1 in the prompt pass (many rows): speed of the bf16-weight
GEMMs (exact widening + MKL sgemm, the default, vs the vdpbf16ps kernel) on GPT-2 124M's shapes,
and its accuracy at model level (random GPT-2 124M, next-token distributions of one forward over
256 random tokens). Run: `python benchmarks/dev/bf16_dot_prompt.py` (2 threads; output:
benchmarks/results/cpu/bf16_dot_prompt.txt). Needs a CPU with avx512_bf16."""
import copy
import os
import platform
import subprocess
import time

import torch

import gptfast
from gptfast import GPT, GPTConfig
from gptfast.ops import native

torch.set_num_threads(2)
native.ensure_loaded()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"{cpu}, {os.cpu_count()} cores, 2 threads, torch {torch.__version__}, git {sha}, {platform.python_version()}")
g = torch.Generator().manual_seed(0)


def best_ms(f, n=7):
    f()
    t = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return 1e3 * min(t)


print("op level (ops.linear on the native backend, bf16 weight, fp32 x), best of 7, alternating:")
for M in (16, 64, 512):
    for K, N in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
        x = torch.randn(M, K, generator=g)
        w = (torch.randn(N, K, generator=g) / K**0.5).bfloat16()
        r = {}
        for rnd in range(2):
            for dot in ("0", "1"):
                os.environ["GPTFAST_BF16_DOT"] = dot
                r.setdefault(dot, []).append(best_ms(lambda: native.linear(x, w)))
        a, b = min(r["0"]), min(r["1"])
        fl = 2 * M * N * K
        print(f"  M={M:4d} {K:5d}->{N:5d}: default {a:7.3f} ms ({fl / a / 1e6:4.0f} GFLOP/s)  "
              f"bf16 dot {b:7.3f} ms ({fl / b / 1e6:4.0f} GFLOP/s)  x{a / b:.2f}")

print("model level: GPT-2 124M random weights, one forward over 256 random tokens (the prompt pass's GEMMs):")
model = GPT(GPTConfig(), backend="native").eval()
idx = torch.randint(0, 50257, (1, 256), generator=g)
mb = gptfast.quantize(copy.deepcopy(model), "bf16")
with torch.inference_mode():
    lf = model(idx)[0].log_softmax(-1).double()
    os.environ["GPTFAST_BF16_DOT"] = "0"
    la = mb(idx)[0].log_softmax(-1).double()
    os.environ["GPTFAST_BF16_DOT"] = "1"
    lb = mb(idx)[0].log_softmax(-1).double()
    ms = {k: [] for k in ("0", "1")}
    for rnd in range(3):
        for dot in ("0", "1"):
            os.environ["GPTFAST_BF16_DOT"] = dot
            ms[dot].append(best_ms(lambda: mb(idx), n=3))
os.environ.pop("GPTFAST_BF16_DOT")
kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()  # noqa: E731
print(f"  mean KL(fp32 || bf16 weights) {kl(lf, la):.2e}; KL(fp32 || bf16 weights + bf16 dot) {kl(lf, lb):.2e}; "
      f"KL(bf16 || bf16 dot) {kl(la, lb):.2e}")
print(f"  argmax = fp32: bf16 {(la.argmax(-1) == lf.argmax(-1)).float().mean().item():.3f}, "
      f"bf16 dot {(lb.argmax(-1) == lf.argmax(-1)).float().mean().item():.3f}")
print(f"  max |logprob - fp32|: bf16 {(la - lf).abs().max().item():.2e}, bf16 dot {(lb - lf).abs().max().item():.2e}")
print(f"  forward of 256 tokens (all logits), best of 3 rounds: bf16 {min(ms['0']):.1f} ms, bf16 dot {min(ms['1']):.1f} ms "
      f"(x{min(ms['0']) / min(ms['1']):.2f})")
