"""How much of the llama.cpp peer's time is spent outside llama.cpp: the benchmark drives llama.cpp
from Python (llama-cpp-python's ctypes API, one batched llama_decode per step, argmax with NumPy),
so its rows include that loop. Times the same generation as `gptfast bench generate` (GPT-2 124M,
random weights exported by gptfast's GGUF writer, 16-token prompts, 256 new tokens, greedy, 2
threads) and the part of it inside llama_decode. Run: `python benchmarks/dev/llama_cpp_loop_share.py`
(needs llama-cpp-python and gguf; output: benchmarks/results/cpu/llama_cpp_loop_share.txt)."""
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from gptfast import GPT, GPTConfig
from gptfast.bench.peers import LlamaCppPeer
from gptfast.gguf import save_gguf

torch.manual_seed(0)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"{cpu}, {os.cpu_count()} cores, 2 threads, git {sha}")
m = GPT(GPTConfig()).eval()
g = torch.Generator().manual_seed(0)
with tempfile.TemporaryDirectory() as work:
    for fmt in ("f32", "f16", "q8_0"):
        path = Path(work) / f"m-{fmt}.gguf"
        save_gguf(m, path, dtype=fmt)
        for B in (1, 8):
            prompts = torch.randint(0, 50257, (B, 16), generator=g).tolist()
            peer = LlamaCppPeer(path, B, 16 + 256 + 1, 2)
            inside = [0.0]
            real = peer.L.llama_decode

            def timed_decode(ctx, batch, real=real):
                s = time.perf_counter()
                rc = real(ctx, batch)
                inside[0] += time.perf_counter() - s
                return rc

            peer.L.llama_decode = timed_decode
            try:
                peer.generate(prompts, 4)
                best = None
                for _ in range(3):
                    inside[0] = 0.0
                    s = time.perf_counter()
                    peer.generate(prompts, 256)
                    total = time.perf_counter() - s
                    if best is None or total < best[0]:
                        best = (total, inside[0])
            finally:
                peer.L.llama_decode = real
                peer.close()
            total, ins = best
            print(f"  {fmt:5s} B={B}: {B * 256 / total:6.1f} tok/s; inside llama_decode {100 * ins / total:5.1f} % "
                  f"(outside: {1e3 * (total - ins) / 256:.3f} ms per step)")
