"""The GPT-2 architecture (Radford et al. 2019), written to read like the lecture it comes from.

Pre-LayerNorm transformer blocks with residual connections, learned position embeddings, a final
LayerNorm and an LM head tied to the token embedding. Module names follow nanoGPT / GPT-2
(`transformer.h.0.attn.c_attn`, ...) so state dicts map one-to-one. The hot computations
(attention, LayerNorm, the MLP, every linear layer) go through `gptfast.ops`, so one model runs on
any backend.

One forward serves training, the prompt pass and decoding, as gpt-fast's
(github.com/pytorch-labs/gpt-fast, model.py): `model(idx)` is the plain causal forward;
after `model.setup_caches(batch, max_len)`, `model(idx, input_pos=...)` also writes keys and
values into a static KV cache (`gptfast.kv_cache`) and a one-token step attends to it
(`ops.decode_attention`). `gptfast.generate` only orchestrates these calls. Weight formats
(bf16 weights, later int8 / int4) are module swaps (`gptfast.quantize`): the forward never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast import ops
from gptfast.ops import reference
from gptfast.config import GPTConfig
from gptfast.errors import InputError
from gptfast.kv_cache import KVCache

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


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose product runs through `ops.linear`, so
    the backend picks the kernel (native CPU: a GEMV that streams the weight once for a few rows).
    `gptfast.quantize` swaps it for a variant holding its weight in another format."""

    backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, backend=self.backend)


@dataclass
class _Step:
    """What a cached forward (`input_pos` given) tells every attention layer, computed once."""

    decode: bool  # one token per row against the cache; else a prompt pass from position 0
    rows: torch.Tensor | None = None  # prefill: cache rows to fill (None = 0..b-1)
    lengths: torch.Tensor | None = None  # prefill: real length of each (right-padded) row
    slots: torch.Tensor | None = None  # decode: see KVCache.decode_slots
    cache_lens: torch.Tensor | None = None  # decode: (B,) valid positions after this step
    decode_attention: object = None  # decode: the resolved backend function


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend: str | None = None
        self.kv_cache: KVCache | None = None

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, nh, T, hs)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        return q, k, v

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) under the causal mask for this layer's input x (B, T, C)
        (the output of ln_1): (B, nh, T, T) fp32. The matrix the fused kernels apply without
        ever storing it (`gptfast.attention_map` draws it)."""
        q, k, _ = self.split_heads(x)
        return reference.attention_probs(q, k)

    def forward(self, x: torch.Tensor, step: _Step | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.split_heads(x)
        if step is None:  # training / plain inference: attention over these T tokens
            dropout_p = self.attn_dropout if self.training else 0.0
            y = ops.causal_attention(q, k, v, dropout_p=dropout_p, backend=self.backend)
        elif not step.decode:  # prompt pass: fill the cache, attend within the prompt
            self.kv_cache.prefill(k, v, step.rows, step.lengths)
            y = ops.causal_attention(q, k, v, backend=self.backend)
        else:  # one token per row, at its own position, against the cache
            cache = self.kv_cache
            cache.decode(k, v, step.slots, step.cache_lens)
            y = step.decode_attention(q, cache.k, cache.v, step.cache_lens, None)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation  # "gelu_tanh" (GPT-2) or "gelu" (exact, nanoGPT)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.c_fc) is Linear and type(self.c_proj) is Linear or _weight_only_bf16(self.c_fc, self.c_proj):
            # c_fc -> GELU -> c_proj, with bias + GELU fused by the op (which also reads
            # weight-only bf16 matrices).
            y = ops.gelu_mlp(
                x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                activation=self.activation, backend=self.backend,
            )
        else:  # another weight format: its own linears, GELU between
            h = self.c_fc(x)
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
            y = self.c_proj(h)
        return self.dropout(y)


def _weight_only_bf16(*linears: nn.Module) -> bool:
    return all(getattr(m, "weight_format", None) == "bf16" for m in linears)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: _Step | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)
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
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
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
            if m is not self and hasattr(m, "backend"):  # every op-calling module, swapped ones too
                m.backend = name

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the position embedding's; weight formats may differ)."""
        return self.transformer.wpe.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.wpe.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). non_embedding=True leaves out position
        embeddings (and the token embedding when it is not tied to the head), as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------------- KV cache

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static KV cache in every attention layer: (max_batch_size, n_head,
        max_seq_length, head_dim) keys and values in `dtype` (default: the activations'), on the
        model's device. Replaces caches set up before (their contents are lost). Needed by
        `forward(..., input_pos=...)`; `clear_caches` frees them."""
        cfg = self.config
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_length", max_seq_length)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"setup_caches: {name} must be an int >= 1, got {v!r}")
        if max_seq_length > cfg.block_size:
            raise InputError(f"setup_caches: max_seq_length {max_seq_length} exceeds the block size {cfg.block_size}")
        dtype = dtype or self.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch_size, cfg.n_head, max_seq_length, cfg.n_embd // cfg.n_head,
                                          dtype, self.device)

    def clear_caches(self) -> None:
        """Free the KV caches (`setup_caches` makes new ones)."""
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def kv_caches(self) -> list[KVCache] | None:
        """The layers' caches (None when not set up)."""
        caches = [block.attn.kv_cache for block in self.transformer.h]
        return None if any(c is None for c in caches) else caches

    def _cached_step(self, idx: torch.Tensor, input_pos: torch.Tensor, rows, lengths) -> _Step:
        """Check a cached forward's arguments (once, here: the layers trust them) and build what
        the layers need."""
        caches = self.kv_caches
        if caches is None:
            raise InputError("GPT.forward: input_pos needs a KV cache; call model.setup_caches(batch, max_len) first")
        cache = caches[0]
        b, T = idx.shape
        if not isinstance(input_pos, torch.Tensor) or input_pos.dtype != torch.long:
            raise InputError(f"GPT.forward: input_pos must be an int64 tensor, got {_describe(input_pos)}")
        if input_pos.device != idx.device:
            raise InputError(f"GPT.forward: input_pos must be on idx's device {idx.device}, got {input_pos.device}")
        checking = not (torch.compiler.is_compiling()
                        or (idx.device.type == "cuda" and torch.cuda.is_current_stream_capturing()))
        if input_pos.dim() == 2:  # decode: (B, 1), one token per cache row at its own position
            if T != 1 or tuple(input_pos.shape) != (b, 1) or b != cache.batch:
                raise InputError(f"GPT.forward: a decode step takes idx (B, 1) and input_pos (B, 1) with B the cache's "
                                 f"batch {cache.batch}, got idx {tuple(idx.shape)} and input_pos {tuple(input_pos.shape)}")
            if rows is not None or lengths is not None:
                raise InputError("GPT.forward: rows / lengths are prompt-pass arguments (input_pos of shape (T,))")
            pos = input_pos.view(b)
            if checking and bool(((pos < 0) | (pos >= cache.max_len)).any()):
                raise InputError(f"GPT.forward: input_pos must lie in [0, {cache.max_len}) (the cache length), got "
                                 f"{pos.tolist()}")
            fn = ops.resolved("decode_attention", idx.device.type, self.backend, dtype=cache.k.dtype,
                              head_dim=cache.k.shape[-1])
            return _Step(decode=True, slots=cache.decode_slots(pos), cache_lens=pos + 1, decode_attention=fn)
        if input_pos.dim() != 1 or input_pos.shape[0] != T:
            raise InputError(f"GPT.forward: input_pos must be (T,) = 0..T-1 for a prompt pass or (B, 1) for a decode "
                             f"step; got {tuple(input_pos.shape)} for idx {tuple(idx.shape)}")
        if T > cache.max_len:
            raise InputError(f"GPT.forward: prompt length {T} exceeds the cache length {cache.max_len}")
        if checking and not torch.equal(input_pos.cpu(), torch.arange(T)):
            raise InputError("GPT.forward: a prompt pass starts at position 0: input_pos must be 0..T-1 "
                             "(continuing a prompt from a later position is not supported)")
        if rows is None:
            if b > cache.batch:
                raise InputError(f"GPT.forward: {b} prompts but the cache holds {cache.batch} rows")
        elif tuple(rows.shape) != (b,) or rows.dtype != torch.long:
            raise InputError(f"GPT.forward: rows must be ({b},) int64 cache rows, got {_describe(rows)}")
        elif checking and bool(((rows < 0) | (rows >= cache.batch)).any()):
            raise InputError(f"GPT.forward: rows must lie in [0, {cache.batch}), got {rows.tolist()}")
        if lengths is None:
            lengths = torch.full((b,), T, dtype=torch.long, device=idx.device)
        elif tuple(lengths.shape) != (b,) or lengths.dtype != torch.long:
            raise InputError(f"GPT.forward: lengths must be ({b},) int64, got {_describe(lengths)}")
        elif checking and bool(((lengths < 1) | (lengths > T)).any()):
            raise InputError(f"GPT.forward: lengths must lie in [1, {T}], got {lengths.tolist()}")
        return _Step(decode=False, rows=rows, lengths=lengths)

    # ------------------------------------------------------------------------- forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) int64 token ids, T <= block_size; targets: (B, T) or None (-1 = ignore).

        Returns (logits (B, T, vocab_size), mean cross-entropy loss or None).

        With a KV cache (`setup_caches`), `input_pos` says where the tokens go:
        - (T,) = 0..T-1: a prompt pass. Keys / values of every position are written to the cache
          (rows `rows`, default 0..B-1); prompts of different lengths are right-padded, with
          `lengths` (B,) their real lengths (default T). Attention is causal within the prompt.
        - (B, 1): a decode step, idx (B, 1) one token per cache row at its own position
          input_pos[b]; the row then attends to cache positions 0..input_pos[b].
        last_only: logits only at each row's last real position (lengths - 1), (B, 1, V): what
        generation needs, without the LM head over the whole prompt.
        """
        if idx.dim() != 2:
            raise InputError(f"GPT.forward: idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise InputError(
                f"GPT.forward: sequence length {T} exceeds the block size {self.config.block_size}"
            )
        if input_pos is None:
            if rows is not None or lengths is not None:
                raise InputError("GPT.forward: rows / lengths need input_pos (a cached prompt pass)")
            step = None
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            if targets is not None:
                raise InputError("GPT.forward: targets (training) and input_pos (cached inference) do not mix")
            step = self._cached_step(idx, input_pos, rows, lengths)
            lengths = step.lengths
            pos = input_pos
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, step)
        if last_only:
            last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=idx.device)
            x = x[torch.arange(B, device=idx.device), last].unsqueeze(1)  # (B, 1, C)
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

        nanoGPT's signature, run by `gptfast.generation.generate` (KV-cached); extra keyword arguments
        (seed, generator, eot_token, repetition_penalty, overflow, dtype, compile, ...) are passed
        to it. Beyond the block size the context slides exactly as
        `gptfast.generation.generate_reference` (the no-cache reference) does.
        """
        from gptfast.generation import generate_tensor  # a convenience on the model: see docs/ARCHITECTURE.md

        return generate_tensor(
            self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, **kwargs
        )

    @classmethod
    def from_pretrained(cls, path_or_name: str, **kwargs) -> "GPT":
        """Load a Hugging Face GPT-2 directory or hub name, a nanoGPT ckpt.pt or a gptfast
        checkpoint (see `gptfast.io`)."""
        from gptfast.io import from_pretrained

        return from_pretrained(path_or_name, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write a Hugging Face GPT-2 directory (`transformers.GPT2LMHeadModel` loads it)."""
        from gptfast.io import save_pretrained

        save_pretrained(self, directory)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


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
