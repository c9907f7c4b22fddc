"""A static, preallocated KV cache: one per attention layer, set up by `GPT.setup_caches`.

As gpt-fast's `KVCache` (github.com/pytorch-labs/gpt-fast, model.py): fixed shapes, so a decode
step has static shapes (what `torch.compile` / CUDA graphs want), and the cache is written in
place. Unlike gpt-fast's, rows are ragged: every row has its own length (`lens`), its prompt is
right-padded, and each decode step writes each row's key / value at that row's own position.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class KVCache(nn.Module):
    """Keys and values of one attention layer: k, v (B, H, T_max, D); lens (B,) int64, the
    number of valid positions of each row (positions >= lens[b] hold stale or padding entries that
    no query attends to).

    Zeros, not empty: a backend may multiply masked-out (zero-probability) slots by their values,
    and 0 * NaN from uninitialised memory would poison the sum.
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        # non-persistent: a cache is run-time state, never part of a checkpoint
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lens", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None,
                lengths: torch.Tensor) -> None:
        """Write a prompt's keys / values (b, H, T, D) at positions 0..T-1 of cache rows `rows`
        (None: rows 0..b-1); `lengths` (b,) are the rows' real lengths (the rest is padding)."""
        b, _, T, _ = k.shape
        if rows is None:
            self.k[:b, :, :T].copy_(k)
            self.v[:b, :, :T].copy_(v)
            self.lens[:b].copy_(lengths)
        else:
            self.k[rows, :, :T] = k
            self.v[rows, :, :T] = v
            self.lens[rows] = lengths

    def decode_slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Row indices of the cache viewed as (B*H*T_max, D) that receive each row's new key /
        value at position pos (B,): computed once per step for all layers (one index_copy_ per
        tensor is cheaper than advanced indexing)."""
        B, H, T_max, _ = self.k.shape
        return (torch.arange(B * H, device=pos.device).view(B, H) * T_max + pos.view(B, 1)).view(-1)

    def decode(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache_lens: torch.Tensor) -> None:
        """Write one token's key / value per row, k, v (B, H, 1, D), at `slots` (see
        `decode_slots`); the rows' lengths become `cache_lens` (B,)."""
        D = k.shape[-1]
        self.k.view(-1, D).index_copy_(0, slots, k.reshape(-1, D))
        self.v.view(-1, D).index_copy_(0, slots, v.reshape(-1, D))
        self.lens.copy_(cache_lens)
