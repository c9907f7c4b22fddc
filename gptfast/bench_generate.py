"""End-to-end generation benchmark: the KV-cached engine vs Hugging Face vs the no-cache reference,
against the memory-bandwidth bound, all in one run with the same random weights.

    from gptfast.bench_generate import benchmark_generate
    rows = benchmark_generate()            # GPT-2 124M shape, batch 1 and 8, 16 + 256 tokens

Formulas (next to the code that computes them):
- tokens/s = B * new_tokens / wall time of the whole generate call (prompt pass included), the
  same for every contestant. ms/token = wall time / new_tokens (one decoding step of the batch).
- bound: a decoding step must read every weight once plus each row's K/V cache, so
  step time >= bytes_per_step / read_bw, bytes_per_step = weight_bytes + B * kv_bytes(mean length),
  weight_bytes = (all parameters - position table) * element size (the tied head is read once as
  the LM head; the embedding rows read are negligible), kv_bytes(L) = 2 * n_layer * n_embd * L * e.
  read_bw is a read-only `src.sum()` over 256 MiB measured in this run
  (`gptfast.bench.timing.measure_peaks`). % of bound = bound step time / measured step time.
  The weight-only bf16 row is held to its own bound (weight_bytes / 2 + the same fp32 K/V bytes).
"""

from __future__ import annotations

import statistics
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
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
) -> list[dict]:
    """Rows {op, mode, shape, backend, status, reason, tokens_per_s, ms_per_token, median_ms,
    speedup_vs_hf, gbps, pct_of_bound, pct_peak, batch, new_tokens, ...}, one per contestant per
    batch size, plus a `bound` row. `quick` cuts new tokens to 32 and the batch sizes to (1,).
    backends: engine op backends to time ('torch', 'native', 'auto', ...); one unavailable here
    gives a row with status 'unavailable' and the reason. variants: for an engine that runs the
    fused native CPU step, also time it with the Python step and with weight-only bf16.
    hf_static: also time Hugging Face with its static cache (rows get `speedup_vs_hf_static`);
    default: on CUDA only (the GPU target is set against it). compiled_too: also time each engine
    with its decode step compiled (`compile=True`; CUDA graphs on CUDA); default: on CUDA only."""
    from gptfast import ops
    from gptfast.bench.timing import measure_peaks
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
    peaks = measure_peaks(torch.device(device).type, quick=quick)
    read_bw = peaks["read_gbps"] * 1e9
    g = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    shape_of = lambda B: f"{model_preset} L{cfg.n_layer} B={B} prompt={prompt_len} new={new_tokens}"  # noqa: E731

    def row(B, backend, **kw):
        r = dict(op="generate", mode=f"{dtype} greedy", shape=shape_of(B), backend=backend, status="ok",
                 reason="", batch=B, new_tokens=new_tokens, prompt_len=prompt_len,
                 read_gbps=peaks["read_gbps"], weight_bytes=weight_bytes)
        r.update(kw)
        rows.append(r)
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
        same = min(next((i for i, (a, b) in enumerate(zip(rw, rg)) if a != b), len(rw)) for rw, rg in zip(want, got))
        b16 = row(B, f"engine[{be}] bf16 weights", seconds=t, weight_copy_mb=stats.get("weight_copy_bytes", 0) / 1e6,
                  reason=f"matrices bf16, fp32 math; greedy = fp32 engine for the first {same}/{new_tokens} "
                         f"tokens (min over rows)")
        b16["own_step_bytes"] = step_bytes - weight_bytes / 2  # the same K/V bytes, half the weight bytes

    for B in batch_sizes:
        prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=g).to(device)
        mean_len = prompt_len + new_tokens / 2
        step_bytes = weight_bytes + B * 2 * cfg.n_layer * cfg.n_embd * mean_len * esize
        bound_step_s = step_bytes / read_bw
        start = len(rows)
        for be in backends:
            if be == "triton" and torch.device(device).type != "cuda":
                row(B, f"engine[{be}]", status="unavailable",
                    reason="Triton runs on CUDA only here (its CPU interpreter is for tests)")
                continue
            try:
                ops.resolve("decode_attention", torch.device(device).type, be, dtype=wdtype,
                            head_dim=cfg.head_dim)
                kw = dict(temperature=0.0, backend=be, dtype=wdtype, compile=compile)
                generate(model, prompt, 4, **kw)  # warm-up: weight copies, kernels, compile
                stats: dict = {}
                t = _timed(lambda: generate(model, prompt, new_tokens, stats=stats, **kw), repeats)
                names = sorted(set(stats.get("backends", {}).values()))
                row(B, f"engine[{be}]", seconds=t, reason="ops: " + "+".join(names)
                    + (", fused step" if stats.get("decode_step") == "native fused" else ""),
                    weight_copy_mb=stats.get("weight_copy_bytes", 0) / 1e6)
                if variants and stats.get("decode_step") == "native fused":
                    _native_variants(B, be, kw, t)
                if not compile and (compiled_too if compiled_too is not None else torch.device(device).type == "cuda"):
                    # the decode step under torch.compile (CUDA: CUDA graphs, mode="reduce-overhead")
                    kwc = dict(kw, compile=True)
                    generate(model, prompt, 4, **kwc)
                    generate(model, prompt, 4, **kwc)  # CUDA graphs record on a later call than the compile
                    t = _timed(lambda: generate(model, prompt, new_tokens, **kwc), repeats)
                    row(B, f"engine[{be}] compiled", seconds=t, reason="ops: " + "+".join(names)
                        + ", decode step torch.compile'd" + (" (CUDA graphs)" if torch.device(device).type == "cuda"
                                                            else ""))
            except ops.BackendUnavailableError as e:
                row(B, f"engine[{be}]", status="unavailable", reason=str(e).splitlines()[0])
        if include_hf:
            try:
                hf = _hf_copy(model).to(device)
                if wdtype != torch.float32:
                    hf = hf.to(wdtype)
                mask = torch.ones_like(prompt)
                kw = dict(attention_mask=mask, do_sample=False, use_cache=True,
                          pad_token_id=cfg.vocab_size - 1)
                with torch.inference_mode():
                    hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)
                    t = _timed(lambda: hf.generate(prompt, max_new_tokens=new_tokens,
                                                   min_new_tokens=new_tokens, **kw), repeats)
                row(B, "hf", seconds=t, reason="transformers GPT2LMHeadModel.generate(use_cache=True)")
                if hf_static if hf_static is not None else torch.device(device).type == "cuda":
                    # Hugging Face's fast path on GPU (the issue's GPU baseline): a preallocated cache
                    kw_s = dict(kw, cache_implementation="static")
                    with torch.inference_mode():
                        hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw_s)
                        t = _timed(lambda: hf.generate(prompt, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, **kw_s), repeats)
                    row(B, "hf (static cache)", seconds=t,
                        reason='transformers generate(use_cache=True, cache_implementation="static")')
                del hf
            except ImportError as e:
                row(B, "hf", status="unavailable", reason=f"transformers not installed ({e})")
        if include_reference:
            model.backend = "torch"
            n = reference_tokens
            generate_reference(model, prompt, 1, temperature=0.0)
            t = _timed(lambda: generate_reference(model, prompt, n, temperature=0.0), 1)
            model.backend = None
            row(B, "reference (no cache)", seconds=t * new_tokens / n,
                reason=f"timed on {n} tokens, scaled to {new_tokens}")
        for r in rows[start:]:
            if r["status"] != "ok":
                continue
            t = r.pop("seconds")
            r["tokens_per_s"] = B * new_tokens / t
            r["ms_per_token"] = r["median_ms"] = 1e3 * t / new_tokens
            own = r.pop("own_step_bytes", step_bytes)  # bf16 weights: its own bytes per step
            r["gbps"] = own * new_tokens / t / 1e9  # bytes a decoding step must read x steps/s
            r["pct_of_bound"] = r["pct_peak"] = 100.0 * (own / read_bw) * new_tokens / t
        for name, key in (("hf", "speedup_vs_hf"), ("hf (static cache)", "speedup_vs_hf_static")):
            base = [r for r in rows[start:] if r["backend"] == name and r["status"] == "ok"]
            if base:
                for r in rows[start:]:
                    if r.get("tokens_per_s"):
                        r[key] = r["tokens_per_s"] / base[0]["tokens_per_s"]
        row(B, "bound", tokens_per_s=B / bound_step_s, ms_per_token=1e3 * bound_step_s,
            reason=f"read-only {peaks['read_gbps']:.1f} GB/s / {step_bytes / 1e6:.0f} MB per step")
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `benchmark_generate` rows (a "vs HF static" column when timed)."""
    static = any(r.get("speedup_vs_hf_static") is not None for r in rows)
    head = (f"{'shape':38s} {'backend':30s} {'tok/s':>8s} {'ms/tok':>8s} {'vs HF':>6s} "
            + (f"{'vs HF static':>12s} " if static else "") + f"{'% bound':>8s}  note")
    out = [head, "-" * len(head)]
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        note = r.get("reason", "") if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        out.append(f"{r['shape']:38s} {r['backend']:30s} {f('tokens_per_s', '8.1f')} "
                   f"{f('ms_per_token', '8.2f')} {f('speedup_vs_hf', '6.2f')} "
                   + (f"{f('speedup_vs_hf_static', '12.2f')} " if static else "")
                   + f"{f('pct_of_bound', '8.1f')}  {note}")
    return "\n".join(out)


if __name__ == "__main__":  # python -m gptfast.bench_generate [--quick]
    import sys

    print(format_rows(benchmark_generate(quick="--quick" in sys.argv)))
