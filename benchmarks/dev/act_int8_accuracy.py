"""Accuracy of the act_int8 option (int8 activations + integer dot products) vs weight-only, per linear
on GPT-2 shapes and for a random GPT-2 124M (KL of next-token distributions). Run:
`python benchmarks/dev/act_int8_accuracy.py` (output: benchmarks/results/cpu/act_int8_accuracy.txt)."""
import copy, torch, gptfast
from gptfast import GPT, GPTConfig
from gptfast.ops.quant import quantize_weight
from gptfast.ops import native
native.ensure_loaded()
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
print("op level, x ~ N(0,1) rows (M=8), W ~ N(0,1/K):")
for name, bits, gs in (("int8", 8, None), ("int8-g32", 8, 32)):
    for K, N in ((768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)):
        w = torch.randn(N, K, generator=g) / K**0.5
        q, s, z = quantize_weight(w, bits, gs)
        x = torch.randn(8, K, generator=g)
        wo = torch.ops.gptfast.quantized_linear(x, q, s, None, None, bits, gs or 0, False).double()
        ac = torch.ops.gptfast.quantized_linear(x, q, s, None, None, bits, gs or 0, True).double()
        rel = ((ac - wo).norm() / wo.norm()).item()
        mx = ((ac - wo).abs().max() / wo.abs().max()).item()
        print(f"  {name:9s} {K:5d}->{N:5d}: rel. RMS error {rel:.2e}, max |err| / max |y| {mx:.2e}")
print("model level: GPT-2 124M random weights, next-token distributions over 64 random tokens (one forward):")
model = GPT(GPTConfig(), backend="native").eval()
idx = torch.randint(0, 50257, (1, 64), generator=g)
for fmt in ("int8", "int8-g32"):
    a = gptfast.quantize(copy.deepcopy(model), fmt)
    b = gptfast.quantize(copy.deepcopy(model), fmt, act_int8=True)
    with torch.inference_mode():
        la = a(idx)[0].log_softmax(-1).double()
        lb = b(idx)[0].log_softmax(-1).double()
        lf = model(idx)[0].log_softmax(-1).double()
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    kl_f = (lf.exp() * (lf - la)).sum(-1).mean().item()
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    print(f"  {fmt:9s}: mean KL(weight-only || act_int8) {kl:.2e} (weight-only vs fp32: {kl_f:.2e}); argmax agreement {agree:.3f}")
