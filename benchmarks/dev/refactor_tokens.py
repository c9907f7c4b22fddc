"""Greedy + seeded-sampling tokens for the #17 before/after check. Usage: python refactor_tokens.py OUT.json old|new
(with the tree to test on PYTHONPATH; compare the two JSON files)."""
import json, sys, torch
import gptfast
from gptfast.config import GPTConfig
from gptfast.model import GPT
api = sys.argv[2]
torch.manual_seed(0)
out = {}
def run(tag, model, prompts, n, bf16):
    if api == "old":
        kw = {"weight_dtype": "bf16"} if bf16 else {}
        out[tag] = gptfast.generate(model, prompts, n, temperature=0.0, **kw)
    else:
        m = model
        if bf16:
            import copy
            m = gptfast.quantize(copy.deepcopy(model), "bf16")
        out[tag] = gptfast.generate(m, prompts, n, temperature=0.0)
    # sampled, seeded
    if not bf16:
        out[tag + "-seeded"] = gptfast.generate(model, prompts, n, temperature=0.9, top_k=50, top_p=0.95, seed=[1 + i for i in range(len(prompts))])
try:
    from gptfast.io.checkpoint import default_model
except ImportError:
    from gptfast.checkpoint import default_model
try:
    from gptfast.io import load as _load
except Exception:
    from gptfast.checkpoint import load_any as _load
ship = default_model()
m, tok = ship[0], ship[1] if isinstance(ship, tuple) else (ship, None)
m = ship[0] if isinstance(ship, tuple) else ship
m.eval()
enc = [[5, 6, 7, 8, 9], [10, 11, 12], [1] * 40, [3, 4]]
run("ship-b1", m, enc[:1], 300, False)
run("ship-b4", m, enc, 300, False)
run("ship-b1-bf16", m, enc[:1], 300, True)
torch.manual_seed(0)
g = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()
p = torch.randint(0, 50257, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
p[3] = p[3][:5]
run("gpt2-b1", g, p[:1], 64, False)
run("gpt2-b8", g, p, 64, False)
run("gpt2-b8-bf16", g, p, 64, True)
run("gpt2-b20", g, (p * 3)[:20], 16, False)
json.dump(out, open(sys.argv[1], "w"))
print({k: v[0][:8] for k, v in out.items()})
