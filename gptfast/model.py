"""The GPT-2 architecture (Radford et al. 2019), written to read like the lecture it comes from.

Pre-LayerNorm transformer blocks with residual connections, learned position embeddings, a final
LayerNorm and an LM head tied to the token embedding. Module names follow nanoGPT / GPT-2
(`transformer.h.0.attn.c_attn`, ...) so state dicts map one-to-one. The hot computations
(attention, LayerNorm, MLP) go through `gptfast.ops`, so one model runs on any backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast import ops
from gptfast.config import GPTConfig
from gptfast.errors import InputError


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no `bias=False` before 2.1)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend: str | None = None

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, nh, T, hs)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_heads(x)
        dropout_p = self.attn_dropout if self.training else 0.0
        y = ops.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation  # "gelu_tanh" (GPT-2) or "gelu" (exact, nanoGPT)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # c_fc -> GELU -> c_proj, with bias + GELU fused by the op.
        y = ops.gelu_mlp(
            x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
            activation=self.activation, backend=self.backend,
        )
        return self.dropout(y)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 language model. `GPT(config, backend=None)`; `backend` picks the op backend for this
    model ('reference', 'torch', 'native', 'triton', 'auto'; None = the global choice)."""

    def __init__(self, config: GPTConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Weight tying (Press & Wolf 2017), as GPT-2: one matrix embeds and un-embeds tokens.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): each block adds two of them to the residual sum.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.backend = backend

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None:
            ops.requested_backend(name)  # validates the name
        self._backend = name
        for m in self.modules():
            if isinstance(m, (LayerNorm, CausalSelfAttention, MLP)):
                m.backend = name

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding=True leaves out position
        embeddings (and the token embedding when it is not tied to the head), as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size; targets: (B, T) or None (-1 = ignore).

        Returns (logits (B, T, vocab_size), mean cross-entropy loss or None).
        """
        if idx.dim() != 2:
            raise InputError(f"GPT.forward: idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise InputError(
                f"GPT.forward: sequence length {T} exceeds the block size {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) by `max_new_tokens` tokens; returns (B, T + new).

        nanoGPT's signature, run on the KV-cached engine (`gptfast.engine`); extra keyword
        arguments (seed, generator, eot_token, repetition_penalty, overflow, dtype, compile, ...)
        are passed to `gptfast.engine.generate`. Beyond the block size the context slides exactly
        as `gptfast.generation.generate_reference` (the no-cache reference) does.
        """
        from gptfast.engine import generate_tensor

        return generate_tensor(
            self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **kwargs
        )

    @classmethod
    def from_pretrained(cls, path_or_name: str, **kwargs) -> "GPT":
        """Load a Hugging Face GPT-2 directory or hub name, a nanoGPT ckpt.pt or a gptfast
        checkpoint (see `gptfast.interop`)."""
        from gptfast.interop import from_pretrained

        return from_pretrained(path_or_name, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write a Hugging Face GPT-2 directory (`transformers.GPT2LMHeadModel` loads it)."""
        from gptfast.interop import save_pretrained

        save_pretrained(self, directory)


class BigramLanguageModel(nn.Module):
    """The simplest baseline: the next token's logits are looked up from the current token alone."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, generator=None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -1:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
