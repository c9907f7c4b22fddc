"""Reference text generation: no KV cache, the whole (cropped) context re-run for every token.

This is the readable truth the fast engine is checked against (greedy outputs must match).
"""

from __future__ import annotations

import torch

from gptfast import ops
from gptfast.errors import InputError


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded `torch.Generator` on `device`, or None when seed is None (global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


@torch.no_grad()
def generate_reference(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eot_token: int | None = None,
) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to each row of idx (B, T) int64.

    The context fed to the model is cropped to its block size (a sliding window). temperature 0
    is greedy. `seed` (or an explicit `generator`) makes sampling reproducible. When `eot_token`
    is given, a row that produced it is finished: later positions of that row are filled with
    `eot_token`, and generation stops early once every row is finished.
    Returns (B, T + n) with n <= max_new_tokens.
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise InputError(f"generate: idx must be (B, T) int64, got {idx.dtype} {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise InputError("generate: idx must hold at least one token per row (got T=0)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if generator is None:
        generator = make_generator(seed, idx.device)
    block_size = model.config.block_size
    backend = getattr(model, "backend", None)
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -block_size:]
            logits, _ = model(idx_cond)
            next_id = ops.sample(
                logits[:, -1, :], temperature, top_k, top_p, generator, backend=backend
            )  # (B,)
            if eot_token is not None:
                next_id = next_id.masked_fill(finished, eot_token)
                finished |= next_id == eot_token
            idx = torch.cat((idx, next_id.unsqueeze(1)), dim=1)
            if eot_token is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx
