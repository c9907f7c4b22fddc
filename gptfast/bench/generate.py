"""End-to-end generation benchmark: the KV-cached engine vs Hugging Face (at its best), the peers a
user would pick instead (CTranslate2, llama.cpp) where installed, and the no-cache reference,
against the memory-bandwidth bound, all in one run with the same random weights; and the prompt
pass (time to first token) of the same contestants.

    from gptfast.bench.generate import benchmark_generate, format_rows
    rows = benchmark_generate()            # GPT-2 124M shape, batch 1 and 8, 16 + 256 tokens

Decoding contestants (rows with op "generate"; a peer that is not installed gives an
'unavailable' row with the reason; the runners are in `gptfast.bench.peers`):
- engine[<backend>]: `gptfast.generate` with that op backend; on CPU with fp32 weights and the
  native or auto backend also "engine[<backend>] bf16 weights": the same model after
  `gptfast.quantize(copy, "bf16")` (weight-only bf16, fp32 math). On CUDA also "compiled".
- hf, hf (no mask), hf (static cache): transformers `GPT2LMHeadModel.generate`, greedy, KV cache;
  the fastest of the three is the baseline of the "vs HF" column (`hf_baseline`).
- ctranslate2 float32 / int8 and llama.cpp f32 / f16 / bf16 / q8_0 on the same weights.
Peers' greedy tokens are compared with the gptfast fp32 engine's (the row's note says for how
many tokens they agree; random weights give near-flat logits where rounding flips an argmax).

Prompt-pass contestants (rows with op "ttft", batch 1, one row per prompt length of
`ttft_prompts`, default 16 and 512 tokens): the engines, Hugging Face (attention mask) and the
peers, each timed as a call that generates exactly one new token from the prompt (gptfast
`generate(model, [prompt], 1)`, HF `generate(max_new_tokens=1)`, CTranslate2
`generate_batch(max_length=1)`, llama.cpp one batched `llama_decode` of the prompt + argmax):
ttft_ms = median wall time of that call. `ttft_vs_llama_cpp` = the fastest llama.cpp prompt pass
at the same weight bytes (f32 for fp32 rows, f16 / bf16 for bf16 rows) / this row's time (> 1:
faster than llama.cpp).

Formulas (next to the code that computes them):
- tokens/s = B * new_tokens / wall time of the whole generate call (prompt pass included), the
  same for every contestant. ms/token = wall time / new_tokens (one decoding step of the batch).
- bound: a decoding step must read every weight once plus each row's K/V cache, so
  step time >= bytes_per_step / read_bw, bytes_per_step = weight_bytes + B * kv_bytes(mean length),
  weight_bytes = (all parameters - position table) * element size (the tied head is read once as
  the LM head; the embedding rows read are negligible), kv_bytes(L) = 2 * n_layer * n_embd * L * e.
  read_bw: `gptfast.bench.timing.measure_read_bandwidth` (streaming reads of >= 1 GiB by several
  methods, the benchmark's threads, best of several; docs/PERF.md#read-bandwidth) measured at the
  start and at the end of this run, and briefly (READ_BW_LIGHT, best of 2) after every timed
  decoding contestant; the bound uses the best reading of the run (a peak is what the machine
  can do), and the table prints the start and end readings' min / median / max. % of bound =
  bound step time / measured step time. % local (`pct_of_local_bound`) = the same with the
  better of the two readings just before and after the row (this VM's bandwidth drifts 2-3x
  within minutes, so a run-wide bound can be far from the machine's state during one row). Rows with other weight bytes are held to their own bound: bf16
  weights (weight_bytes / 2), llama.cpp f16 / bf16 (/ 2) and q8_0 (x 34 / 128: 34 bytes per 32
  weights), CTranslate2 int8 (/ 4, its scales ignored), always plus the same fp32 K/V bytes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys

import torch

from gptfast.bench.peers import (
    CT2_TYPES,
    GGUF_TYPES,
    PEERS,
    WEIGHT_SCALE,
    CT2Peer,
    LlamaCppPeer,
    agree,
    hf_copy,
    hf_dir_for_peers,
    peer_unavailable,
)
from gptfast.bench.timing import time_calls

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the short reading between contestants: the two methods that read fastest here (docs/PERF.md)
READ_BW_LIGHT = ("sum", "max_i32")
TTFT_PROMPTS = (16, 512)
# Weight formats whose bytes match (for the TTFT ratio to llama.cpp): ours -> llama.cpp's
# gptfast weight format -> llama.cpp formats of the same bytes (and the same layout for q8_0 / q4_0)
_SAME_BYTES = {"fp32": ("f32",), "bf16": ("f16", "bf16"), "int8-g32": ("q8_0",), "int4-g32": ("q4_0",)}
# quantized engine rows (CPU, fp32 model, native / auto): every format with a llama.cpp twin, and int8 per channel
QUANT_FORMATS = ("int8", "int8-g32", "int4-g32")


def _as_dtype(dtype) -> torch.dtype:
    """'fp32' / 'fp16' / 'bf16' or a torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"benchmark_generate: dtype must be one of {tuple(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"[:300]


@contextlib.contextmanager
def _bf16_dot(on: bool):
    """GPTFAST_BF16_DOT (read by the kernels at each call) set to "1" or "0" for the block, so a
    row runs the arithmetic its name says whatever the caller's environment holds; restored after."""
    old = os.environ.get("GPTFAST_BF16_DOT")
    os.environ["GPTFAST_BF16_DOT"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPTFAST_BF16_DOT", None)
        else:
            os.environ["GPTFAST_BF16_DOT"] = old


def _has_avx512_bf16() -> bool:
    """Whether this CPU has avx512_bf16 (Linux /proc/cpuinfo; elsewhere: no)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


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
    ttft_prompts=TTFT_PROMPTS,
    read_bw_between: bool = True,
    quant_formats=None,
) -> list[dict]:
    """Rows {op, mode, shape, backend, status, reason, tokens_per_s, ms_per_token, median_ms,
    speedup_vs_hf, gbps, pct_of_bound, pct_peak, batch, new_tokens, ...}, one per contestant per
    batch size, plus a `bound` row; then the prompt-pass rows {op: "ttft", prompt_len, ttft_ms,
    ttft_vs_llama_cpp, weights, ...}. `quick` cuts new tokens to 32, the batch sizes to (1,) and
    the peer formats to float32 / int8 (CTranslate2) and f32 / q8_0 (llama.cpp).
    backends: engine op backends to time ('torch', 'native', 'auto', ...); one unavailable here
    gives a row with status 'unavailable' and the reason. variants: for the native / auto
    backend on CPU with fp32 weights, also time weight-only bf16 (`gptfast.quantize`), bf16 with
    the bf16-dot option, and `quant_formats` (default QUANT_FORMATS; ("int8-g32",) with quick).
    hf_variants: Hugging Face also without an attention mask; hf_static: also with its static
    cache (default: on); the fastest Hugging Face row is the "vs HF" baseline (`hf_baseline`),
    and rows also get `speedup_vs_hf_static` (the GPU target's baseline). compiled_too: also
    time each engine with its decode step compiled (`compile=True`; CUDA graphs on CUDA); default:
    on CUDA only. peers: which of PEERS to time (CPU, fp32 model weights only); ct2_types /
    gguf_types: their weight formats (default: all of CT2_TYPES / GGUF_TYPES, fewer with quick).
    read_bw_bytes: the bandwidth buffer (default: max(1 GiB, 8 x LLC)). ttft_prompts: prompt
    lengths of the prompt-pass rows (() for none; a length over the block size gives an
    'unavailable' row). read_bw_between: also a short bandwidth reading after every timed
    decoding contestant (READ_BW_LIGHT), for each row's local bound (`pct_of_local_bound`)."""
    import tempfile
    from pathlib import Path

    import gptfast
    from gptfast import ops
    from gptfast.bench import timing
    from gptfast.config import GPTConfig
    from gptfast.generation import generate_reference
    from gptfast.model import GPT

    generate = gptfast.generate
    if threads:
        torch.set_num_threads(int(threads))
    if quick:
        new_tokens, batch_sizes, reference_tokens = min(new_tokens, 32), tuple(batch_sizes)[:1], 4
    repeats = max(1, int(repeats or 1))
    ttft_prompts = tuple(int(p) for p in (ttft_prompts or ()))
    if any(p < 1 for p in ttft_prompts):
        raise ValueError(f"benchmark_generate: ttft_prompts must be positive lengths, got {ttft_prompts}")
    overrides = {"dropout": 0.0}
    if n_layer:
        overrides["n_layer"] = n_layer
    cfg = GPTConfig.from_preset(model_preset, **overrides)
    torch.manual_seed(seed)
    model = GPT(cfg).eval().to(device)
    wdtype = _as_dtype(dtype)
    if wdtype != torch.float32:
        model = model.to(wdtype)
    esize = torch.empty((), dtype=wdtype).element_size()
    weight_bytes = (model.num_params() - model.transformer.wpe.weight.numel()) * esize
    dev_type = torch.device(device).type
    bw_repeats = 5 if quick else 9
    # measure_read_bandwidth is looked up on the module at call time (tests replace it)
    bw_start = timing.measure_read_bandwidth(dev_type, nbytes=read_bw_bytes, repeats=bw_repeats)
    between: list[float] = []  # the short readings after each timed decoding contestant, GB/s
    last_read = [bw_start["gbps"]]  # the most recent reading, whichever kind
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
    quant_formats = tuple(quant_formats if quant_formats is not None else (("int8-g32",) if quick else QUANT_FORMATS))
    from gptfast.quantize import FORMATS as _QFORMATS
    from gptfast.quantize import weight_bytes as qbytes

    if any(f not in _QFORMATS for f in quant_formats):
        raise ValueError(f"benchmark_generate: quant_formats must be a subset of {_QFORMATS}, got {quant_formats}")
    # bytes a step reads: every weight but the position table (one row of it per token), each
    # format's own (quantized matrices + their scales; vectors stay fp32)
    wpe_bytes = model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size()
    fp_bytes = qbytes(model) - wpe_bytes
    for name, got, known in (("ct2_types", ct2_types, CT2_TYPES), ("gguf_types", gguf_types, GGUF_TYPES)):
        if any(t not in known for t in got):
            raise ValueError(f"benchmark_generate: {name} must be a subset of {known}, got {got}")
    work = tempfile.TemporaryDirectory(prefix="gptfast-peers-") if peers else None
    peer_failed: dict = {}  # (peer, format) -> the reason it is unavailable
    hf_for_peers: list = []  # [(HF directory, token strings)] once written
    engines: dict = {}  # engine row name -> (model, generate keywords) of the engines that ran

    def row(B, backend, **kw):
        r = dict(op="generate", mode=f"{dtype} greedy", shape=shape_of(B), backend=backend, status="ok",
                 reason="", batch=B, new_tokens=new_tokens, prompt_len=prompt_len, weight_bytes=weight_bytes)
        r.update(kw)
        rows.append(r)
        if read_bw_between and r["op"] == "generate" and r.get("seconds"):
            # the machine's bandwidth right before (the last reading) and right after this contestant
            after = timing.measure_read_bandwidth(dev_type, nbytes=read_bw_bytes, repeats=2,
                                                  methods=READ_BW_LIGHT if dev_type == "cpu" else None)["gbps"]
            r.update(read_before_gbps=last_read[0], read_after_gbps=after)
            between.append(after)
            last_read[0] = after
        # progress: one line per contestant as it finishes (a full run takes ~15 min on 2 cores)
        t = r.get("seconds")  # wall seconds of one generate() of new_tokens, where timed
        if r["op"] == "ttft":
            done = f"first token after {r['ttft_ms']:.1f} ms" if r.get("ttft_ms") else r["status"]
            where = f"prompt={r['prompt_len']}"
        else:
            done = f"{B * new_tokens / t:.1f} tok/s" if isinstance(t, (int, float)) and t > 0 else r["status"]
            where = f"B={B}"
        print(f"bench generate: {where} {backend}: {done}", file=sys.stderr, flush=True)
        return r

    def _format_row(B, be, prompt, kw, fmt: str, dot: bool = False, act: bool = False):
        """The engine on another weight format (bound and % of bound on its own bytes):
        `gptfast.quantize(copy, fmt)`, the same generate() call. fmt "bf16": bf16 matrices, fp32 math;
        dot=True: the named option GPTFAST_BF16_DOT=1 (activations rounded to bf16, bf16 dot
        products with fp32 accumulation: the arithmetic llama.cpp's bf16 format uses), on CPUs with
        avx512_bf16. int8 / int4 formats: weight-only, dequantized in registers (gptfast.quantize);
        act=True (int8 formats): the named option act_int8 (activations quantized per row and
        32-block, integer dot products: llama.cpp's q8_0 x q8_0 arithmetic)."""
        name = f"engine[{be}] {fmt} weights" + (", bf16 dot" if dot else "") + (", act_int8" if act else "")
        if dot and not _has_avx512_bf16():
            row(B, name, status="unavailable", reason="GPTFAST_BF16_DOT needs a CPU with avx512_bf16")
            return
        key = f"engine[{be}] {fmt} weights" + (", act_int8" if act else "")
        try:
            with _bf16_dot(dot):
                if key not in engines:
                    engines[key] = (gptfast.quantize(copy.deepcopy(model), fmt, act_int8=act), kw)
                mq = engines[key][0]
                generate(mq, prompt, 4, **kw)
                stats: dict = {}
                t, got = time_calls(lambda: generate(mq, prompt, new_tokens, stats=stats, **kw), repeats)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row with the reason
            if not dot:
                engines.pop(key, None)
            row(B, name, status="error", reason=_first_line(e))
            return
        want = generate(model, prompt, new_tokens, **kw)
        if fmt == "bf16":
            how = ("matrices bf16, activations rounded to bf16 in the skinny GEMV (GPTFAST_BF16_DOT=1, "
                   "as llama.cpp's bf16)" if dot else "matrices bf16, fp32 math")
        elif act:
            how = ("act_int8: activations quantized to int8 per row and 32-block, integer dot products "
                   "(llama.cpp's q8_0 x q8_0 arithmetic; AVX-512 VNNI where the CPU has it)")
        else:
            how = "weight-only, dequantized in registers, fp32 math"
        # greedy tokens identical to the fp32 engine's up to the first difference, fewest over rows
        # (random weights give near-flat logits, where any rounding eventually flips an argmax)
        row(B, name, seconds=t, weight_scale=(qbytes(mq) - wpe_bytes) / fp_bytes, weights=fmt,
            weight_format=stats.get("weight_format"),
            reason=f"gptfast.quantize(model, {fmt!r}): {how}; {stats.get('decode_step')} step; greedy = fp32 "
                   f"engine for the first {agree(want, got)}/{new_tokens} tokens (min over rows)")

    def _peer(name: str, fmt: str, n_seq: int, n_ctx_seq: int):
        """A fresh runner for `name` at weight format `fmt` (the caller closes it right after its
        rows: a peer's thread pool left alive slowed whatever ran next, e.g. gptfast batch 8 by 15 %
        after a CTranslate2 generator had run once; the conversions are kept on disk), or a string
        saying why there is none (remembered: a failing peer is not retried)."""
        key = (name, fmt)
        if key in peer_failed:
            return peer_failed[key]
        why = peer_unavailable(name)
        if why is None and (dev_type != "cpu" or wdtype != torch.float32):
            why = "peers are timed on CPU with fp32 model weights only (--device cpu --dtype fp32)"
        if why is not None:
            peer_failed[key] = why
            return why
        wd = Path(work.name)
        try:
            if name == "ctranslate2":
                if not hf_for_peers:
                    hf_for_peers.append(hf_dir_for_peers(model, wd / "hf"))
                return CT2Peer(*hf_for_peers[0], wd, fmt, nthreads)
            from gptfast.gguf import save_gguf

            path = wd / f"model-{fmt}.gguf"
            if not path.exists():
                save_gguf(model, path, dtype=fmt)
            return LlamaCppPeer(path, n_seq, n_ctx_seq, nthreads)
        except Exception as e:  # noqa: BLE001 - a failing peer is a row with the reason
            peer_failed[key] = _first_line(e)
            return peer_failed[key]

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
                kw = dict(temperature=0.0, backend=be, compile=compile)
                generate(model, prompt, 4, **kw)  # warm-up: kernels, compile
                stats: dict = {}
                t, out = time_calls(lambda: generate(model, prompt, new_tokens, stats=stats, **kw), repeats)
                if want_tokens is None:
                    want_tokens = out
                names = sorted(set(stats.get("backends", {}).values()))
                engines[f"engine[{be}]"] = (model, kw)
                row(B, f"engine[{be}]", seconds=t, weights=dtype, reason="ops: " + "+".join(names)
                    + (", fused step" if stats.get("decode_step") == "native fused" else ""))
                if variants and be in ("native", "auto") and dev_type == "cpu" and wdtype == torch.float32:
                    _format_row(B, be, prompt, kw, "bf16")
                    _format_row(B, be, prompt, kw, "bf16", dot=True)
                    for fmt in quant_formats:
                        _format_row(B, be, prompt, kw, fmt)
                    for fmt in (f for f in quant_formats if f.startswith("int8")):
                        _format_row(B, be, prompt, kw, fmt, act=True)
                if not compile and (compiled_too if compiled_too is not None else dev_type == "cuda"):
                    # the decode step under torch.compile (CUDA: CUDA graphs, mode="reduce-overhead")
                    kwc = dict(kw, compile=True)
                    generate(model, prompt, 4, **kwc)
                    generate(model, prompt, 4, **kwc)  # CUDA graphs record on a later call than the compile
                    t, _ = time_calls(lambda: generate(model, prompt, new_tokens, **kwc), repeats)
                    row(B, f"engine[{be}] compiled", seconds=t, weights=dtype, reason="ops: " + "+".join(names)
                        + ", decode step torch.compile'd" + (" (CUDA graphs)" if dev_type == "cuda" else ""))
            except ops.BackendUnavailableError as e:
                row(B, f"engine[{be}]", status="unavailable", reason=str(e).splitlines()[0])
        if include_hf:
            try:
                hf = hf_copy(model).to(device)
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
                        t, _ = time_calls(lambda: hf.generate(prompt, max_new_tokens=new_tokens,
                                                              min_new_tokens=new_tokens, **kw), repeats)
                    row(B, name, seconds=t, weights=dtype, reason=f"transformers GPT2LMHeadModel.{what}")
                del hf
            except ImportError as e:
                row(B, "hf", status="unavailable", reason=f"transformers not installed ({e})")
        for name in peers:
            fmts = ct2_types if name == "ctranslate2" else gguf_types
            for fmt in fmts:
                runner = _peer(name, fmt, B, prompt_len + new_tokens + 1)
                if isinstance(runner, str):
                    row(B, f"{name} {fmt}", status="unavailable", reason=runner)
                    continue
                plist = prompt.tolist()
                try:
                    runner.generate(plist, 4)  # warm-up
                    t, out = time_calls(lambda: runner.generate(plist, new_tokens), repeats)
                except Exception as e:  # noqa: BLE001
                    row(B, f"{name} {fmt}", status="error", reason=_first_line(e))
                    continue
                finally:
                    runner.close()  # nothing of a peer stays alive while the next contestant runs
                same = (f"; greedy = gptfast fp32 engine for the first {agree(want_tokens, out)}/{new_tokens} "
                        "tokens (min over rows)") if want_tokens is not None else ""
                how = (f"CTranslate2 {runner.version} {fmt}, generate_batch greedy" if name == "ctranslate2" else
                       f"llama-cpp-python {runner.version}, our GGUF {fmt}, batched llama_decode, argmax")
                row(B, f"{name} {fmt}", seconds=t, weight_scale=WEIGHT_SCALE[fmt], weights=fmt, reason=how + same)
        if include_reference:
            model.backend = "torch"
            n = reference_tokens
            generate_reference(model, prompt, 1, temperature=0.0)
            t, _ = time_calls(lambda: generate_reference(model, prompt, n, temperature=0.0), 1)
            model.backend = None
            row(B, "reference (no cache)", seconds=t * new_tokens / n, weights=dtype,
                reason=f"timed on {n} tokens, scaled to {new_tokens}")
        for r in rows[start:]:
            r["step_bytes"] = weight_bytes * r.pop("weight_scale", 1.0) + kv_bytes
        row(B, "bound", step_bytes=weight_bytes + kv_bytes)

    ttft_start = len(rows)
    for P in ttft_prompts:
        _ttft_rows(P, row, model, cfg, engines, generate, include_hf, peers, ct2_types, gguf_types, _peer,
                   device, dtype, wdtype, max(3, repeats), g, model_preset)
    _ttft_ratios(rows[ttft_start:])
    if work is not None:
        work.cleanup()

    # The bandwidth again at the end: the bound uses the best reading of the run.
    bw_end = timing.measure_read_bandwidth(dev_type, nbytes=read_bw_bytes, repeats=bw_repeats)
    read_gbps = max([bw_start["gbps"], bw_end["gbps"], *between])  # the best reading of the run
    read_bw = read_gbps * 1e9
    bw_info = dict(read_gbps=read_gbps, read_method=(bw_start if bw_start["gbps"] >= bw_end["gbps"] else bw_end)["method"],
                   read_between_n=len(between), read_between_min_gbps=min(between, default=None),
                   read_between_max_gbps=max(between, default=None),
                   **{f"read_{when}_{k}_gbps": bw[f"{k}_gbps"] for when, bw in (("start", bw_start), ("end", bw_end))
                      for k in ("min", "median", "max")})
    for when, bw in (("start", bw_start), ("end", bw_end)):  # every method's best: the JSON keeps them all
        bw_info[f"read_{when}_spread_pct"] = bw.get("spread_pct")
        for m, st in (bw.get("methods") or {}).items():
            bw_info[f"read_{when}_{m}_gbps"] = st["best_gbps"]
    for r in rows:
        r.update(bw_info)
    for B in batch_sizes:
        group = [r for r in rows if r["batch"] == B and r["op"] == "generate"]
        for r in group:
            own = r.pop("step_bytes")
            if r["backend"] == "bound":
                r["tokens_per_s"] = B * read_bw / own
                r["ms_per_token"] = 1e3 * own / read_bw
                r["reason"] = f"read {read_gbps:.1f} GB/s (best reading of the run) / {own / 1e6:.0f} MB per step"
                continue
            if r["status"] != "ok":
                continue
            t = r.pop("seconds")
            r["tokens_per_s"] = B * new_tokens / t
            r["ms_per_token"] = r["median_ms"] = 1e3 * t / new_tokens
            r["gbps"] = own * new_tokens / t / 1e9  # bytes a decoding step must read x steps/s
            r["pct_of_bound"] = r["pct_peak"] = 100.0 * (own / read_bw) * new_tokens / t
            if r.get("read_after_gbps"):
                # the bound from the readings just before and after this contestant: the VM's
                # bandwidth drifts 2-3x within minutes (docs/PERF.md#read-bandwidth)
                r["read_local_gbps"] = local = max(r["read_before_gbps"], r["read_after_gbps"])
                r["pct_of_local_bound"] = 100.0 * (own / (local * 1e9)) * new_tokens / t
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


def _ttft_rows(P, row, model, cfg, engines, generate, include_hf, peers, ct2_types, gguf_types, peer,
               device, dtype, wdtype, repeats, g, model_preset) -> None:
    """The prompt-pass rows for one prompt length P (batch 1): every engine that ran, Hugging Face
    (attention mask) and the peers, each timed as a call generating one token from the prompt."""
    shape = f"{model_preset} L{cfg.n_layer} B=1 prompt={P} -> first token"

    def ttft_row(backend, **kw):
        return row(1, backend, op="ttft", mode=f"{dtype} prompt pass", shape=shape, prompt_len=P, new_tokens=1, **kw)

    if P + 1 > cfg.block_size:
        ttft_row("all", status="unavailable",
                 reason=f"a {P}-token prompt and its first token exceed the block size {cfg.block_size}")
        return
    prompt = torch.randint(0, cfg.vocab_size, (1, P), generator=g).to(device)
    plist = prompt.tolist()
    first = None  # the gptfast fp32 engine's first token

    def timed(fn):
        fn()  # warm-up
        return time_calls(fn, repeats)

    contestants = [(name, m, kw, False) for name, (m, kw) in engines.items()]
    # bf16 weights also with the named option GPTFAST_BF16_DOT=1 (bf16 dot products in the prompt
    # pass's GEMMs too: llama.cpp's bf16 arithmetic), where the CPU has avx512_bf16
    contestants += [(f"{name}, bf16 dot", m, kw, True) for name, (m, kw) in engines.items()
                    if name.endswith(" bf16 weights")]
    for name, m, kw, dot in contestants:
        if dot and not _has_avx512_bf16():
            ttft_row(name, status="unavailable", reason="GPTFAST_BF16_DOT needs a CPU with avx512_bf16")
            continue
        try:
            with _bf16_dot(dot):
                t, out = timed(lambda: generate(m, prompt, 1, **kw))
        except Exception as e:  # noqa: BLE001
            ttft_row(name, status="error", reason=_first_line(e))
            continue
        if first is None:
            first = out[0][0]
        base = name.split(", ")[0]  # "engine[native] int8 weights, act_int8" -> its format's name
        weights = base.split("] ", 1)[1][: -len(" weights")] if base.endswith(" weights") else dtype
        ttft_row(name, ttft_ms=1e3 * t, median_ms=1e3 * t, weights=weights,
                 reason=f"gptfast.generate(model, [prompt], 1), median of {repeats}"
                 + ("; GPTFAST_BF16_DOT=1 (activations rounded to bf16, vdpbf16ps)" if dot else "")
                 + (f"; first token = fp32 engine's: {out[0][0] == first}" if weights != dtype else ""))
    if include_hf:
        try:
            hf = hf_copy(model).to(device)
            if wdtype != torch.float32:
                hf = hf.to(wdtype)
            kw = dict(do_sample=False, use_cache=True, pad_token_id=cfg.vocab_size - 1,
                      attention_mask=torch.ones_like(prompt), max_new_tokens=1, min_new_tokens=1)
            with torch.inference_mode():
                t, out = timed(lambda: hf.generate(prompt, **kw))
            ttft_row("hf", ttft_ms=1e3 * t, median_ms=1e3 * t, weights=dtype,
                     reason=f"transformers GPT2LMHeadModel.generate(max_new_tokens=1), median of {repeats}")
            del hf
        except ImportError as e:
            ttft_row("hf", status="unavailable", reason=f"transformers not installed ({e})")
    for name in peers:
        for fmt in (ct2_types if name == "ctranslate2" else gguf_types):
            runner = peer(name, fmt, 1, P + 1)  # a llama.cpp context sized for this prompt
            if isinstance(runner, str):
                ttft_row(f"{name} {fmt}", status="unavailable", reason=runner)
                continue
            try:
                t, out = timed(lambda: runner.generate(plist, 1))
            except Exception as e:  # noqa: BLE001
                ttft_row(f"{name} {fmt}", status="error", reason=_first_line(e))
                continue
            finally:
                runner.close()
            how = ("CTranslate2 generate_batch(max_length=1)" if name == "ctranslate2" else
                   "llama.cpp: one llama_decode of the prompt (logits of the last token), argmax")
            same = f"; first token = gptfast fp32 engine's: {out[0][0] == first}" if first is not None else ""
            ttft_row(f"{name} {fmt}", ttft_ms=1e3 * t, median_ms=1e3 * t, weights=fmt,
                     reason=f"{how}, median of {repeats}{same}")


def _ttft_ratios(rows: list[dict]) -> None:
    """ttft_vs_llama_cpp on gptfast's rows: the fastest llama.cpp prompt pass of the same prompt
    length at the same weight bytes / this row's time (> 1: gptfast is faster)."""
    for r in rows:
        if r.get("ttft_ms") is None or not r["backend"].startswith("engine["):
            continue
        peers = [p["ttft_ms"] for p in rows if p.get("ttft_ms") and p["prompt_len"] == r["prompt_len"]
                 and p["backend"].startswith("llama.cpp ") and p["weights"] in _SAME_BYTES.get(r.get("weights"), ())]
        if peers:
            r["ttft_vs_llama_cpp"] = min(peers) / r["ttft_ms"]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `benchmark_generate` rows (a "vs HF static" column when timed), a
    second table of the prompt-pass rows, and footer lines naming the Hugging Face baseline and
    the bandwidth readings."""
    dec = [r for r in rows if r.get("op", "generate") != "ttft"]
    ttft = [r for r in rows if r.get("op") == "ttft"]
    static = any(r.get("speedup_vs_hf_static") is not None for r in dec)
    head = (f"{'shape':38s} {'backend':30s} {'tok/s':>8s} {'ms/tok':>8s} {'vs HF':>6s} "
            + (f"{'vs HF static':>12s} " if static else "") + f"{'% bound':>8s} {'% local':>8s}  note")
    out = [head, "-" * len(head)]

    def f(r, k, fmt):
        return format("-", ">" + fmt.split(".")[0]) if r.get(k) is None else format(r[k], fmt)

    def note(r):
        n = r.get("reason", "") if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        return ("[vs HF baseline] " + n) if r.get("hf_baseline") else n

    for r in dec:
        out.append(f"{r['shape']:38s} {r['backend']:30s} {f(r, 'tokens_per_s', '8.1f')} "
                   f"{f(r, 'ms_per_token', '8.2f')} {f(r, 'speedup_vs_hf', '6.2f')} "
                   + (f"{f(r, 'speedup_vs_hf_static', '12.2f')} " if static else "")
                   + f"{f(r, 'pct_of_bound', '8.1f')} {f(r, 'pct_of_local_bound', '8.1f')}  {note(r)}")
    if ttft:
        head = f"{'prompt pass (time to first token)':46s} {'backend':30s} {'TTFT ms':>8s} {'vs llama.cpp':>12s}  note"
        out += ["", head, "-" * len(head)]
        for r in ttft:
            out.append(f"{r['shape']:46s} {r['backend']:30s} {f(r, 'ttft_ms', '8.1f')} "
                       f"{f(r, 'ttft_vs_llama_cpp', '12.2f')}  {note(r)}")
        out.append("vs llama.cpp = the fastest llama.cpp prompt pass at the same weight bytes (f32; f16/bf16 for "
                   "bf16 weights) / the row's TTFT (> 1: faster)")
    for r in dec:
        if r.get("hf_baseline"):
            out.append(f"vs HF ({r['shape']}): the fastest Hugging Face configuration, {r['backend']} "
                       f"({r['tokens_per_s']:.1f} tok/s)")
    bw = next((r for r in rows if r.get("read_start_max_gbps") is not None), None)
    if bw is not None:
        out.append(f"read bandwidth ({bw.get('read_method', '')}): start of run min/median/max "
                   f"{bw['read_start_min_gbps']:.1f}/{bw['read_start_median_gbps']:.1f}/{bw['read_start_max_gbps']:.1f} "
                   f"GB/s, end {bw['read_end_min_gbps']:.1f}/{bw['read_end_median_gbps']:.1f}/"
                   f"{bw['read_end_max_gbps']:.1f} GB/s; bound from the best reading of the run, {bw['read_gbps']:.1f} GB/s")
        if bw.get("read_between_n"):
            out.append(f"  {bw['read_between_n']} short readings after the contestants ({', '.join(READ_BW_LIGHT)}, "
                       f"best of 2): {bw['read_between_min_gbps']:.1f}-{bw['read_between_max_gbps']:.1f} GB/s; "
                       "% local = the bound from the readings just before and after the row")
        methods = sorted({k[len("read_start_"):-len("_gbps")] for k in bw if k.startswith("read_start_")
                          and k.endswith("_gbps") and k[len("read_start_"):-len("_gbps")] not in ("min", "median", "max")})
        if methods:
            out.append("  best per method, start / end: " + ", ".join(
                f"{m} {bw[f'read_start_{m}_gbps']:.1f} / {bw.get(f'read_end_{m}_gbps') or float('nan'):.1f}"
                for m in methods) + " GB/s")
    return "\n".join(out)


if __name__ == "__main__":  # python -m gptfast.bench.generate [--quick]
    print(format_rows(benchmark_generate(quick="--quick" in sys.argv)))
