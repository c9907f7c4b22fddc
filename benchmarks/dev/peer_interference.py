"""A peer left alive in the benchmark's process slows what runs next: gptfast's batch-8 decoding
(GPT-2 124M, fused native step, 16-token prompts, 64 new tokens, greedy, 2 threads, best of 3)
alone, with a CTranslate2 float32 generator loaded, after it has run once, and after it is
released. Why `gptfast bench generate` creates every peer runner for its own rows and closes it
before timing anything else. Run: `python benchmarks/dev/peer_interference.py` (needs ctranslate2
and transformers; output: benchmarks/results/cpu/peer_interference.txt)."""
import gc
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import gptfast
from gptfast import GPT, GPTConfig
from gptfast.bench import peers as P

torch.set_num_threads(2)
torch.manual_seed(0)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"{cpu}, {os.cpu_count()} cores, 2 threads, torch {torch.__version__}, git {sha}")
m = GPT(GPTConfig(), backend="native").eval()
prompt = torch.randint(0, 50257, (8, 16))


def native_b8(tag):
    gptfast.generate(m, prompt, 4, temperature=0.0)
    best = float("inf")
    for _ in range(3):
        s = time.perf_counter()
        gptfast.generate(m, prompt, 64, temperature=0.0)
        best = min(best, time.perf_counter() - s)
    print(f"  {tag:42s} gptfast B8: {8 * 64 / best:6.1f} tok/s", flush=True)


with tempfile.TemporaryDirectory() as work:
    native_b8("alone")
    hf_dir, toks = P.hf_dir_for_peers(m, Path(work) / "hf")
    native_b8("alone (after the conversion)")
    peer = P.CT2Peer(hf_dir, toks, Path(work), "float32", 2)
    native_b8("CTranslate2 generator loaded, not run")
    peer.generate(prompt.tolist(), 4)
    native_b8("after CTranslate2 ran once (alive)")
    peer.close()
    del peer
    gc.collect()
    native_b8("after CTranslate2 was closed")
