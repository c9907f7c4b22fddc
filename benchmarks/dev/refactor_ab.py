"""One A/B round of the #17 refactor in the tree on PYTHONPATH: python refactor_ab.py old|new -> JSON lines.

old: the pre-refactor API (generate(..., weight_dtype="bf16")); new: gptfast.quantize(copy, "bf16").
Driven by benchmarks/dev/refactor_ab.sh (alternating trees per round)."""
import copy, json, sys, time
import torch
import gptfast
from gptfast import GPT, GPTConfig
api = sys.argv[1]
import os
torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
out = []
torch.manual_seed(0)
m = GPT(GPTConfig.from_preset("gpt2", dropout=0.0), backend="native").eval()
g = torch.Generator().manual_seed(1)
P = torch.randint(0, 50257, (8, 16), generator=g).tolist()
m16 = gptfast.quantize(copy.deepcopy(m), "bf16") if api == "new" else None
def run(model, B, n, bf16, backend=None):
    kw = {}
    if api == "old" and bf16:
        kw["weight_dtype"] = "bf16"
    if backend:
        kw["backend"] = backend
    gptfast.generate(model, P[:B], 4, temperature=0.0, **kw)  # warm
    best = 1e9
    for _ in range(2):
        st = {}
        gptfast.generate(model, P[:B], n, temperature=0.0, stats=st, **kw)
        best = min(best, st["decode_s"] / max(1, st["steps"] - 1))
    return best, st["prefill_s"]
for B in (1, 8):
    for bf16 in (False, True):
        model = m16 if (bf16 and api == "new") else m
        s, pre = run(model, B, 64, bf16)
        out.append(dict(case=f"gen B{B} {'bf16' if bf16 else 'fp32'}", tok_s=B / s, prefill_ms=pre * 1e3))
s, pre = run(m, 20, 16, False)
out.append(dict(case="gen B20 fp32 (python step)", tok_s=20 / s, prefill_ms=pre * 1e3))
s, pre = run(m, 1, 32, False, backend="torch")
out.append(dict(case="gen B1 fp32 torch backend", tok_s=1 / s, prefill_ms=pre * 1e3))
# training step: bench train's recipe (4L 4H 128C, B12 T64), native and torch backends
for be in ("native", "torch"):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0)
    tm = GPT(cfg, backend=be).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    idx = torch.randint(0, 65, (12, 65), generator=torch.Generator().manual_seed(2))
    ts = []
    for i in range(25):
        t0 = time.perf_counter()
        _, loss = tm(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        ts.append(time.perf_counter() - t0)
    ts = sorted(ts[5:])
    out.append(dict(case=f"train step {be}", ms=1e3 * ts[len(ts) // 2], loss=float(loss)))
for r in out:
    print(json.dumps(r))
