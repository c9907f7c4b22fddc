"""Text generation: `generate` / `stream` (KV-cached, fast) orchestrate the model's own forward;
`generate_reference` (no cache, the whole context re-run per token) is the readable truth the
fast path is checked against (greedy outputs must match).

Module name: `gptfast.generate` is the function (the top-level API), so this module is `generation`.

KV-cached generation:

The split follows gpt-fast's `generate.py` (github.com/pytorch-labs/gpt-fast): `prefill` runs the
prompts once through `GPT.forward` with `input_pos` = 0..T-1, filling the model's static KV cache
(`GPT.setup_caches`); `decode_one_token` is the hot step (one token per row against the cache,
`input_pos` (B, 1)) and the only thing compiled / CUDA-graph captured; the Python loop in `_run`
does the bookkeeping (stop tokens, lengths, sampling, streaming). Neither knows the block's
computation or the weights' format: that is the model's (`gptfast.model`, `gptfast.quantize`).

On CPU with the native kernels and up to 16 rows the step runs as one native op instead
(`gptfast.fused_decode`), bit-for-bit the model's forward. Measurements: docs/PERF.md.

Beyond the block size: see `overflow` in `generate`.
"""

from __future__ import annotations

import copy
import time
import weakref
from dataclasses import fields
from typing import Iterator, Sequence

import torch

from gptfast import fused_decode, ops
from gptfast.errors import InputError, NonFiniteError
from gptfast.sampling import SamplingParams, apply_repetition_penalty, token_logprobs

__all__ = ["generate", "stream", "generate_tensor", "generate_reference", "prefill", "decode_one_token", "Step",
           "SamplingParams", "make_generator"]

_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


# ----------------------------------------------------------------------------- the two passes


def prefill(model, tokens: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Run right-padded prompts tokens (b, T) (row i's real tokens at 0..lengths[i]-1) through the
    model, filling its KV cache rows `rows` (None: 0..b-1); returns the (b, V) fp32 logits at each
    row's last real position."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    logits, _ = model(tokens, input_pos=pos, rows=rows, lengths=lengths, last_only=True)
    return logits[:, 0].float()


def decode_one_token(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One decoding step: tokens (B,) int64 at positions pos (B,) int64 -> logits (B, V) fp32.
    Shapes are static, so this is what `torch.compile` / CUDA graphs take."""
    logits, _ = model(tokens.view(-1, 1), input_pos=pos.view(-1, 1))
    return logits[:, 0].float()


class _Compiled:
    """torch.compile'd passes, one pair per model (see `compile=`)."""

    cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_fns(model, device_type: str):
    got = _Compiled.cache.get(model)
    if got is None:
        if device_type == "cuda":
            # gpt-fast: the decode step as CUDA graphs (static cache, static inputs); the prompt
            # pass with dynamic shapes so each prompt length does not recompile.
            got = (torch.compile(prefill, dynamic=True),
                   torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True))
        else:
            got = (prefill, torch.compile(decode_one_token))  # prompt shapes vary; eager for one pass
        _Compiled.cache[model] = got
    return got


# ----------------------------------------------------------------------------- dtype copies

_CAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _param_key(model: torch.nn.Module) -> tuple:
    return tuple((id(t), t._version, t.data_ptr()) for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def _in_dtype(model, dtype: torch.dtype):
    """`model`, or a copy of it in `dtype` when the caller asked for another one (cached per
    model; rebuilt when a parameter changed: in-place optimizer steps and `load_state_dict` bump
    `_version`). Returns (model, bytes held by the copy)."""
    if dtype == model.dtype:
        return model, 0
    if getattr(model, "weight_format", None) is not None:
        raise InputError(f"generate: dtype={dtype} on a model whose weights are in format {model.weight_format!r}; "
                         "quantize a model in the dtype you want instead")
    key = (_param_key(model), dtype)
    hit = _CAST.get(model)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    _CAST.pop(model, None)  # one copy per model at a time: a stale copy must not pin memory
    kv = [b.attn.kv_cache for b in model.transformer.h]
    model.clear_caches()
    try:
        cast = copy.deepcopy(model).to(dtype)
    finally:
        for b, c in zip(model.transformer.h, kv):
            b.attn.kv_cache = c
    nbytes = sum(t.numel() * t.element_size() for t in cast.state_dict().values())
    _CAST[model] = (key, cast, nbytes)
    return cast, nbytes


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def as_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype, or a name in `_DTYPES` -> torch.dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InputError(f"generate: dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


# ----------------------------------------------------------------------------- arguments


def _as_prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise InputError(
                f"generate: prompts tensor must be (B, T) int64, got {prompts.dtype} {tuple(prompts.shape)}"
            )
        return prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"generate: prompts must be a non-empty list of token-id lists or a (B, T) tensor, "
                         f"got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InputError(f"generate: prompts[{i}] must be a list of ints, got {p!r:.80}")
        out.append(list(p))
    return out


def _per_row(value, B: int, name: str) -> list[int]:
    vals = [value] * B if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, (list, tuple)) or len(vals) != B:
        raise InputError(f"generate: {name} must be an int or a list of {B} ints, got {value!r}")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"generate: {name} must be int(s) >= 0, got {value!r}")
    return list(vals)


def _sampling(sampling: SamplingParams | None, kwargs: dict) -> SamplingParams:
    unknown = sorted(set(kwargs) - set(_SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"generate: unexpected keyword argument(s) {unknown}; sampling settings are "
                        f"{list(_SAMPLING_FIELDS)}")
    if sampling is None:
        return SamplingParams(**kwargs)
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"generate: sampling must be a SamplingParams or None, got {type(sampling).__name__}")
    if kwargs:
        raise InputError(f"generate: pass sampling settings either as `sampling=` or as keywords, not both "
                         f"(got sampling and {sorted(kwargs)})")
    return sampling


def _check_step_logits(logits: torch.Tensor, step: int, seqs: list[list[int]], done: list[bool]) -> None:
    """Refuse to sample from NaN / +inf / all -inf logits: say which step (0 = the logits of the
    prompt pass) and which rows, at which position, produced them."""
    bad = {r: what for r, what in ops.nonfinite_logit_rows(logits).items() if not done[r]}
    if bad:
        rows = "; ".join(f"row {r} after {len(seqs[r])} tokens: {what}" for r, what in list(bad.items())[:8])
        raise NonFiniteError(
            f"generate: the model produced non-finite logits at step {step} "
            f"({'the prompt pass' if step == 0 else f'decode step {step}'}) -- {rows}. "
            "The weights or activations overflowed or hold NaN (try --dtype fp32, check the checkpoint)"
        )


# ----------------------------------------------------------------------------- generation


class Step:
    """One step of `stream`: for each row the token produced (None once the row has finished)
    and, with `return_logprobs`, its log-probability (see `token_logprobs`)."""

    __slots__ = ("tokens", "logprobs")

    def __init__(self, tokens: list[int | None], logprobs: list[float | None] | None = None):
        self.tokens = tokens
        self.logprobs = logprobs

    def __repr__(self) -> str:
        return f"Step(tokens={self.tokens!r}, logprobs={self.logprobs!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Step) and (self.tokens, self.logprobs) == (other.tokens, other.logprobs)


def stream(
    model,
    prompts,
    max_new_tokens: int | Sequence[int],
    sampling: SamplingParams | None = None,
    *,
    overflow: str = "slide",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    compile: bool = False,
    stats: dict | None = None,
    **sampling_kwargs,
) -> Iterator[Step]:
    """Yield one `Step` per generated position as tokens are produced (arguments as `generate`)."""
    params = _sampling(sampling, sampling_kwargs)
    return _run(model, prompts, max_new_tokens, params, overflow, dtype, backend, compile, stats)


def _run(model, prompts, max_new_tokens, sp: SamplingParams, overflow, dtype, backend, compile,
         stats) -> Iterator[Step]:
    # --- validate once, here ---
    rows_tokens = _as_prompt_lists(prompts)
    B = len(rows_tokens)
    cfg = model.config
    for i, p in enumerate(rows_tokens):
        if not p:
            raise InputError(f"generate: prompts[{i}] is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"generate: prompts[{i}] holds token id {bad[0]} outside [0, {cfg.vocab_size})")
    n_new = _per_row(max_new_tokens, B, "max_new_tokens")
    if overflow not in ("slide", "error"):
        raise InputError(f"generate: overflow must be 'slide' or 'error', got {overflow!r}")
    if sp.eot_token is not None and sp.eot_token >= cfg.vocab_size:
        raise InputError(f"generate: eot_token must be a token id in [0, {cfg.vocab_size}) or None, "
                         f"got {sp.eot_token!r}")
    if backend is not None:
        ops.requested_backend(backend)  # validates the name
    device = model.device
    gens = sp.generators(B, device)
    bs = cfg.block_size
    P = [len(p) for p in rows_tokens]
    need = max(p + n - 1 for p, n in zip(P, n_new))  # positions fed to the model, per the longest row
    if overflow == "error" and need > bs:
        b = max(range(B), key=lambda i: P[i] + n_new[i])
        raise InputError(
            f"generate: prompt length {P[b]} + max_new_tokens {n_new[b]} needs {P[b] + n_new[b] - 1} "
            f"positions, more than the model's block_size {bs}; shorten the prompt or pass overflow='slide'"
        )
    net, copy_bytes = _in_dtype(model, as_dtype(dtype) or model.dtype)
    saved_backend = net.backend
    want = backend if backend is not None else model.backend  # a dtype copy follows its model's choice
    if want != saved_backend:
        net.backend = want
    was_training = net.training
    net.eval()  # dropout off
    try:
        yield from _loop(net, rows_tokens, n_new, sp, gens, need, compile, stats, copy_bytes)
    finally:
        net.train(was_training)
        if net.backend != saved_backend:
            net.backend = saved_backend


def _loop(net, rows_tokens, n_new, sp: SamplingParams, gens, need, compile, stats, copy_bytes) -> Iterator[Step]:
    cfg = net.config
    device = net.device
    B, bs = len(rows_tokens), cfg.block_size
    P0 = [min(len(p), bs) for p in rows_tokens]  # prompts longer than the block are cropped, as the reference does
    T_max = max(max(P0), min(need, bs))
    net.setup_caches(B, T_max)
    caches = net.kv_caches
    if compile and device.type == "cuda":
        for c in caches:
            torch._dynamo.mark_static_address(c.k)
            torch._dynamo.mark_static_address(c.v)
    pre_fn, dec_fn = _compiled_fns(net, device.type) if compile else (prefill, decode_one_token)
    # Native CPU, few rows: the whole step as one op (no Python between kernels), unless the
    # caller asked for torch.compile, which then compiles the model's step.
    fused = None if compile else fused_decode.step_weights(net, B)
    sample = ops.resolved("sample", device.type, net.backend, dtype=torch.float32)
    temperature = float(sp.temperature)
    seqs = [list(p) for p in rows_tokens]  # host copy of every row (prompt + generated)
    count = [0] * B
    done = [n == 0 for n in n_new]
    seen = None
    if sp.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(rows_tokens):
            seen[i, torch.tensor(p, device=device)] = True

    def ours():
        if net.kv_caches is None or net.kv_caches[0] is not caches[0]:
            raise InputError("generate: another generation on the same model replaced its KV cache while this one "
                             "was running; a model runs one generation at a time (use a copy of the model)")

    t0 = time.perf_counter()
    steps = 0
    try:
        with torch.inference_mode():
            Tp = max(P0)
            toks = torch.zeros(B, Tp, dtype=torch.long)
            for i, p in enumerate(rows_tokens):
                toks[i, : P0[i]] = torch.tensor(p[-P0[i]:])
            lens = torch.tensor(P0, dtype=torch.long, device=device)
            logits = pre_fn(net, toks.to(device), lens)  # (B, V)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_prefill = time.perf_counter() - t0
            while not all(done):
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, sp.repetition_penalty)
                if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                    _check_step_logits(logits, steps, seqs, done)
                if len(gens) == 1:
                    u = ops.draw_uniform(logits, temperature, gens[0])
                    nxt = sample(logits, temperature, sp.top_k, sp.top_p, u)  # (B,)
                else:  # one generator per row: row b's draws do not depend on the rest of the batch
                    nxt = torch.cat([sample(logits[i:i + 1], temperature, sp.top_k, sp.top_p,
                                            ops.draw_uniform(logits[i:i + 1], temperature, gens[i]))
                                     for i in range(B)])
                lp = token_logprobs(logits, sp.temperature, nxt).tolist() if sp.return_logprobs else None
                nxt_l = nxt.tolist()
                out_t: list[int | None] = [None] * B
                out_lp: list[float | None] | None = [None] * B if sp.return_logprobs else None
                for i in range(B):
                    if done[i]:
                        continue
                    t = nxt_l[i]
                    seqs[i].append(t)
                    count[i] += 1
                    out_t[i] = t
                    if out_lp is not None:
                        out_lp[i] = lp[i]
                    if (sp.eot_token is not None and t == sp.eot_token) or count[i] >= n_new[i]:
                        done[i] = True
                if seen is not None:
                    seen[torch.arange(B, device=device), nxt] = True
                steps += 1
                yield Step(out_t, out_lp)
                if all(done):
                    break
                ours()
                # --- next logits: feed each row's newest token at its own position ---
                pos_l = [len(s) - 1 for s in seqs]
                slide = [i for i in range(B) if not done[i] and pos_l[i] >= bs]
                pos = torch.tensor([min(p, T_max - 1) for p in pos_l], dtype=torch.long, device=device)
                if fused is not None:
                    logits = fused_decode.decode(net, fused, nxt.to(device), pos)
                else:
                    logits = dec_fn(net, nxt.to(device), pos)
                if slide:
                    # overflow="slide": the reference crops the context to the last block_size
                    # tokens, which moves every token to a new absolute position (position
                    # embeddings restart at 0 for the window), so every cached K/V is stale. A
                    # rolling cache would keep the old positions and NOT match; re-running the
                    # window (a prompt pass of block_size tokens, the reference's own cost) does.
                    # The decode step above wrote garbage at the last slot of these rows; the
                    # prompt pass overwrites their whole cache.
                    win = torch.tensor([seqs[i][-bs:] for i in slide], dtype=torch.long, device=device)
                    rows = torch.tensor(slide, dtype=torch.long, device=device)
                    logits = logits.clone()
                    logits[rows] = pre_fn(net, win, torch.full((len(slide),), bs, dtype=torch.long, device=device),
                                          rows)
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        if net.kv_caches is not None and net.kv_caches[0] is caches[0]:
            net.clear_caches()  # the cache is this call's: do not pin its memory after it
    if stats is not None:
        total = time.perf_counter() - t0
        names = {op: _resolved_name(op, device.type, net.backend, call) for op, call in (
            ("causal_attention", dict(dtype=net.dtype, head_dim=cfg.n_embd // cfg.n_head, dropout_p=0.0)),
            ("decode_attention", dict(dtype=net.dtype, head_dim=cfg.n_embd // cfg.n_head)),
            ("layer_norm", dict(dtype=net.dtype, n=cfg.n_embd)), ("linear", dict(dtype=net.dtype)),
            ("gelu_mlp", dict(dtype=net.dtype, activation=cfg.activation)), ("sample", dict(dtype=torch.float32)))}
        stats.update(prefill_s=t_prefill, decode_s=total - t_prefill, steps=steps,
                     new_tokens=sum(count), total_s=total, backends=names, weight_copy_bytes=copy_bytes,
                     dtype=str(net.dtype).replace("torch.", ""),
                     weight_format=getattr(net, "weight_format", None) or str(net.dtype).replace("torch.", ""),
                     decode_step="native fused" if fused is not None else ("compiled" if compile else "python"))


def _resolved_name(op: str, device_type: str, backend: str | None, call: dict) -> str:
    try:
        return ops.resolve(op, device_type, backend, **call)
    except ops.BackendUnavailableError as e:
        return f"unavailable: {e}"


def generate(
    model,
    prompts,
    max_new_tokens: int | Sequence[int],
    sampling: SamplingParams | None = None,
    *,
    overflow: str = "slide",
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    compile: bool = False,
    stats: dict | None = None,
    **sampling_kwargs,
):
    """KV-cached generation for a batch of prompts of any lengths.

    model: a `gptfast.GPT` (its weights, weight format and op backend are used; its KV cache is
    set up for the call and freed after it).
    prompts: list of B token-id lists (lengths may differ) or a (B, T) int64 tensor.
    max_new_tokens: int, or one int per row (each row stops at its own limit).
    sampling: a `SamplingParams`, or its fields as keywords (temperature=0.0, top_k=50, seed=1,
    eot_token=..., repetition_penalty=..., return_logprobs=True, ...; defaults there).
    overflow: what happens when prompt + new tokens exceed the block size. "slide" (default):
    the context is cropped to the last block_size tokens, exactly as `generate_reference`; every
    token past the block size costs one prompt pass of block_size tokens (see `_loop`). "error": a
    ValueError naming the lengths before anything runs.
    dtype: None (the model's), "fp32", "bf16" or "fp16": weights, activations and cache dtype
    (logits and sampling stay fp32); another dtype than the model's runs a cached copy of it.
    backend: op backend for this call (default: the model's). Weight formats (bf16 weights with
    fp32 math, ...): `gptfast.quantize(model, fmt)` before calling.
    compile: torch.compile the decode step (CUDA: CUDA graphs via mode="reduce-overhead").
    stats: a dict filled with timings (prefill_s, decode_s, steps, new_tokens, backends, ...).

    Returns a list of B lists of new token ids (each ends at its eot or its limit), and with
    return_logprobs a second list of B lists of floats.
    """
    params = _sampling(sampling, sampling_kwargs)
    toks: list[list[int]] = []
    lps: list[list[float]] = []
    for step in _run(model, prompts, max_new_tokens, params, overflow, dtype, backend, compile, stats):
        if not toks:
            toks = [[] for _ in step.tokens]
            lps = [[] for _ in step.tokens]
        for i, t in enumerate(step.tokens):
            if t is not None:
                toks[i].append(t)
                if params.return_logprobs:
                    lps[i].append(step.logprobs[i])
    if not toks:  # max_new_tokens 0 everywhere
        n = len(_as_prompt_lists(prompts))
        toks, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    return (toks, lps) if params.return_logprobs else toks


def generate_tensor(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """`GPT.generate`'s contract: idx (B, T) int64 -> (B, T + n) int64 (keywords as `generate`).

    Rows that stopped at `eot_token` are padded with it; n is the longest row's count (as
    `generate_reference`, which stops once every row has finished).
    """
    if idx.dim() != 2 or idx.dtype != torch.long:
        raise InputError(f"generate: idx must be (B, T) int64, got {idx.dtype} {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise InputError("generate: idx must hold at least one token per row (got T=0)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    rows = generate(model, idx, max_new_tokens, **kwargs)
    n = max(len(r) for r in rows)
    eot = kwargs.get("eot_token")
    if eot is None and isinstance(kwargs.get("sampling"), SamplingParams):
        eot = kwargs["sampling"].eot_token
    new = torch.full((idx.shape[0], n), eot if eot is not None else 0, dtype=torch.long)
    for i, r in enumerate(rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat([idx, new.to(idx.device)], dim=1)


# ----------------------------------------------------------------------------- the reference


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
