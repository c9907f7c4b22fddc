"""pytest-benchmark of one training step (forward, backward, AdamW) per backend.

The model is nanoGPT's CPU shakespeare_char recipe (4 layers, 4 heads, 128 wide, block 64,
batch 12), as in `gptfast bench train`; random tokens, since only the time is measured here
(`gptfast bench train` also compares the loss reached).
"""

from __future__ import annotations

import pytest
import torch

from gptfast.bench.runner import BACKENDS, unavailable
from gptfast.bench.timing import synced


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, backend, bench_device, bench_rounds):
    from gptfast.config import GPTConfig
    from gptfast.model import GPT

    for op, call in (("causal_attention", dict(dtype=torch.float32, head_dim=32, dropout_p=0.0)),
                     ("layer_norm", dict(dtype=torch.float32, n=128)), ("gelu_mlp", dict(dtype=torch.float32))):
        reason = unavailable(backend, op, bench_device, **call)
        if reason is not None:
            pytest.skip(f"{backend}: {op}: {reason}")
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0)
    model = GPT(cfg, backend=backend).to(bench_device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 65, (12, 65), generator=g).to(bench_device)

    def step():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    benchmark.extra_info.update(backend=backend, device=bench_device, tokens_per_step=12 * 64)
    loss = benchmark.pedantic(synced(step, bench_device), rounds=bench_rounds, warmup_rounds=2)
    assert torch.isfinite(loss)
