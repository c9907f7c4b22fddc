"""`gptfast bench generate`: the read-bandwidth bound (method, spread, start and end of the run),
Hugging Face at its best, and the peers (CTranslate2 here; llama.cpp opt-in, slow)."""

from __future__ import annotations

import pytest
import torch

from gptfast.bench import timing
from gptfast import generate
from gptfast.bench.generate import benchmark_generate, format_rows
from gptfast.bench.peers import CT2Peer, hf_dir_for_peers, peer_unavailable
from gptfast.config import GPTConfig
from gptfast.model import GPT


def _peaked(seed=1, **kw) -> GPT:
    """A small GPT-2-vocabulary model whose greedy choices have clear winners (an untied head scaled
    up): peers must pick exactly its tokens, not merely agree until rounding flips a flat argmax."""
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50257, tie_weights=False)
    cfg.update(kw)
    m = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


# ----------------------------------------------------------------------------- read bandwidth


def test_read_bandwidth_methods_and_spread(monkeypatch):
    """A real (small) measurement: every method runs, the result is the fastest method's best
    sample, and the method, threads and spread are recorded."""
    r = timing.measure_read_bandwidth("cpu", nbytes=8 << 20, repeats=4)
    assert set(r["methods"]) == set(timing.READ_METHODS) and r["buffer_mib"] == 8
    for m, st in r["methods"].items():
        assert len(st["samples"]) == 4 and all(x > 0 for x in st["samples"]), m
        assert st["min_gbps"] <= st["median_gbps"] <= st["max_gbps"] == st["best_gbps"] == max(st["samples"])
        assert 0 <= st["spread_pct"] < 100 and st["threads"] == (1 if m == "numpy" else torch.get_num_threads())
    assert r["gbps"] == max(st["best_gbps"] for st in r["methods"].values())
    assert r["gbps"] == r["methods"][r["best_method"]]["best_gbps"] and r["samples"] == r["methods"][r["best_method"]]["samples"]
    assert r["threads"] == torch.get_num_threads()
    assert f"fastest of 4 methods (sum, max_i32, gemv, numpy): {r['best_method']}" in r["method"]
    assert "best of 4" in r["method"]
    with pytest.raises(ValueError, match="nbytes and repeats must be positive, got 0, 3"):
        timing.measure_read_bandwidth("cpu", nbytes=0, repeats=3)
    with pytest.raises(ValueError, match=r"methods must be a non-empty subset of .*got \('memcpy',\)"):
        timing.measure_read_bandwidth("cpu", nbytes=1 << 20, repeats=1, methods=("memcpy",))
    # default buffer: max(1 GiB, 8 x LLC)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 32 << 20)
    assert timing.read_bw_buffer_bytes("cpu") == 1 << 30
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 256 << 20)
    assert timing.read_bw_buffer_bytes("cpu") == 8 * (256 << 20)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: None)  # sysfs unreadable
    assert timing.read_bw_buffer_bytes("cpu") == 1 << 30


def test_read_bandwidth_best_of_and_spread_arithmetic(monkeypatch):
    """With a scripted clock: GB/s = bytes / seconds per sample, rounds interleaved with the
    starting method rotating, the best method's best sample wins, spread = (max - min) / max."""
    nbytes = 1 << 22  # 4 MiB; gemv reads rows * 4096 fp32 = all of it (1 << 20 elements = 256 rows)
    # rounds: r0 sum, max_i32; r1 max_i32, sum; r2 sum, max_i32 (seconds per call)
    durations = [nbytes / 10e9, nbytes / 20e9, nbytes / 16e9, nbytes / 5e9, nbytes / 8e9, nbytes / 25e9]
    clock = iter(sum(([0.0, d] for d in durations), []))
    monkeypatch.setattr(timing, "_clock", lambda: next(clock))
    r = timing.measure_read_bandwidth("cpu", nbytes=nbytes, repeats=3, methods=("sum", "max_i32"))
    approx = lambda xs: pytest.approx(xs, rel=1e-12)  # noqa: E731
    assert r["methods"]["sum"]["samples"] == approx([10.0, 5.0, 8.0])
    assert r["methods"]["max_i32"]["samples"] == approx([20.0, 16.0, 25.0])
    assert r["best_method"] == "max_i32" and r["gbps"] == pytest.approx(25.0)
    assert (r["min_gbps"], r["median_gbps"], r["max_gbps"]) == approx((16.0, 20.0, 25.0))
    assert r["spread_pct"] == pytest.approx(100 * (25 - 16) / 25)
    assert r["methods"]["sum"]["spread_pct"] == pytest.approx(50.0)
    assert "max_i32 (torch int32 view .max())" in r["method"] and "best of 3" in r["method"]


def test_bound_from_best_reading_of_the_run(monkeypatch):
    """The bound uses the best of every reading (start, end, and the short ones after each timed
    contestant); each row's local bound the better of the readings just before and after it."""
    full = iter([dict(gbps=10.0, min_gbps=8.0, median_gbps=9.0, max_gbps=10.0, method="M"),
                 dict(gbps=20.0, min_gbps=15.0, median_gbps=18.0, max_gbps=20.0, method="M")])
    light = iter([25.0, 11.0])

    def fake(device_type, nbytes=None, repeats=7, methods=None):
        if methods is None:  # the start and end readings: every method
            return next(full)
        assert tuple(methods) == ("sum", "max_i32") and repeats == 2
        return dict(gbps=next(light))

    monkeypatch.setattr(timing, "measure_read_bandwidth", fake)
    rows = benchmark_generate("tiny", batch_sizes=(2,), prompt_len=4, new_tokens=6, backends=("torch", "reference"),
                              quick=True, threads=None, include_hf=False, include_reference=False, peers=(),
                              ttft_prompts=())
    by = {r["backend"]: r for r in rows}
    # tiny: 2 layers, 64 wide, vocab 65, block 64: parameters - position table, fp32
    n = (GPT(GPTConfig.from_preset("tiny")).num_params() - 64 * 64) * 4
    step = n + 2 * (2 * 2 * 64 * (4 + 6 / 2) * 4)  # + B x K/V at the mean length
    assert by["bound"]["ms_per_token"] == pytest.approx(1e3 * step / 25e9, rel=1e-12)  # best: a light one
    e, ref = by["engine[torch]"], by["engine[reference]"]
    assert e["read_gbps"] == 25.0 and e["read_start_median_gbps"] == 9.0 and e["read_end_min_gbps"] == 15.0
    assert e["pct_of_bound"] == pytest.approx(100 * by["bound"]["ms_per_token"] / e["ms_per_token"], rel=1e-9)
    # engine[torch]: between the start reading (10) and the first light one (25): local 25
    assert (e["read_before_gbps"], e["read_after_gbps"], e["read_local_gbps"]) == (10.0, 25.0, 25.0)
    assert e["pct_of_local_bound"] == pytest.approx(e["pct_of_bound"], rel=1e-9)
    # engine[reference]: between 25 and 11: local 25 (the better one, here the one before)
    assert (ref["read_before_gbps"], ref["read_after_gbps"], ref["read_local_gbps"]) == (25.0, 11.0, 25.0)
    assert ref["pct_of_local_bound"] == pytest.approx(100 * (step / 25e9) / (ref["ms_per_token"] * 1e-3), rel=1e-9)
    assert "pct_of_local_bound" not in by["bound"]
    text = format_rows(rows)
    assert "start of run min/median/max 8.0/9.0/10.0 GB/s, end 15.0/18.0/20.0 GB/s" in text
    assert "bound from the best reading of the run, 25.0 GB/s" in text
    assert "2 short readings after the contestants (sum, max_i32, best of 2): 11.0-25.0 GB/s" in text


# ----------------------------------------------------------------------------- contestants


def test_hf_variants_and_ctranslate2_rows():
    rows = benchmark_generate("tiny", batch_sizes=(2,), prompt_len=4, new_tokens=6, backends=("torch",),
                              quick=True, threads=None, include_reference=False, peers=("ctranslate2",),
                              read_bw_bytes=16 << 20, ttft_prompts=())
    by = {r["backend"]: r for r in rows}
    hf = [by[k] for k in ("hf", "hf (no mask)", "hf (static cache)")]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in hf)
    best = max(hf, key=lambda r: r["tokens_per_s"])
    assert best.get("hf_baseline") and best["speedup_vs_hf"] == 1.0
    assert sum(bool(r.get("hf_baseline")) for r in rows) == 1
    eng = by["engine[torch]"]
    assert eng["speedup_vs_hf"] == pytest.approx(eng["tokens_per_s"] / best["tokens_per_s"])
    assert f"the fastest Hugging Face configuration, {best['backend']}" in format_rows(rows)
    for k in ("ctranslate2 float32", "ctranslate2 int8"):
        assert by[k]["status"] == "ok" and by[k]["tokens_per_s"] > 0, by[k]
        assert "greedy = gptfast fp32 engine for the first" in by[k]["reason"]
    # int8 is held to its own bytes: a quarter of the weights, the same K/V
    ratio = lambda r: r["pct_of_bound"] / r["tokens_per_s"]  # noqa: E731
    n = rows[0]["weight_bytes"]
    kv = 2 * (2 * 2 * 64 * (4 + 6 / 2) * 4)
    assert ratio(by["ctranslate2 int8"]) / ratio(by["ctranslate2 float32"]) == pytest.approx(
        (n / 4 + kv) / (n + kv), rel=1e-9)


def test_ctranslate2_greedy_tokens_equal_gptfast(tmp_path):
    m = _peaked()
    prompts = [[464, 2068, 7586, 21831], [40, 1101, 257, 3290]]
    want = generate(m, prompts, 12, temperature=0.0)
    d, tokens = hf_dir_for_peers(m, tmp_path / "hf")
    assert tokens[50256] == "<|endoftext|>" and tokens[198] == "\u010a"
    got = CT2Peer(d, tokens, tmp_path, "float32", 1).generate(prompts, 12)
    assert got == want
    assert len(set(want[0])) > 3  # not a degenerate repeat: the comparison means something


def test_peer_arguments_and_missing_peer(monkeypatch):
    with pytest.raises(ValueError, match=r"peers must be a subset of \('ctranslate2', 'llama.cpp'\), got \['vllm'\]"):
        benchmark_generate("tiny", peers=("vllm",), quick=True, threads=None, read_bw_bytes=4 << 20)
    with pytest.raises(ValueError, match="gguf_types must be a subset"):
        benchmark_generate("tiny", gguf_types=("q4_k",), quick=True, threads=None, read_bw_bytes=4 << 20)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a))
    assert "ctranslate2 is not installed (pip install ctranslate2" in peer_unavailable("ctranslate2")
    rows = benchmark_generate("tiny", batch_sizes=(1,), prompt_len=4, new_tokens=4, backends=("torch",), quick=True,
                              threads=None, include_hf=False, include_reference=False, peers=("ctranslate2",),
                              read_bw_bytes=4 << 20, ttft_prompts=())
    r = next(r for r in rows if r["backend"] == "ctranslate2 float32")
    assert r["status"] == "unavailable" and "pip install" in r["reason"]
    assert "unavailable: ctranslate2 is not installed" in format_rows(rows)


@pytest.mark.slow
def test_llama_cpp_peer_batched_greedy_equals_gptfast():
    """llama.cpp (opt-in: pip install 'gptfast[peers]') through the bench's batched decoding loop:
    the same greedy tokens as gptfast for every sequence of a batch, f32 weights."""
    pytest.importorskip("llama_cpp", reason="opt-in peer: pip install 'gptfast[peers]'")
    import tempfile
    from pathlib import Path

    from gptfast.bench.peers import LlamaCppPeer
    from gptfast.gguf import save_gguf

    m = _peaked()
    prompts = [[464, 2068, 7586, 21831], [40, 1101, 257, 3290], [1, 2, 3, 4]]
    want = generate(m, prompts, 12, temperature=0.0)
    with tempfile.TemporaryDirectory() as d:
        path = save_gguf(m, Path(d) / "m.gguf", dtype="f32")
        peer = LlamaCppPeer(path, n_seq=3, n_ctx_seq=32, threads=2)
        try:
            assert peer.generate(prompts, 12) == want
            assert peer.generate(prompts[:1], 12) == want[:1]  # the cache is cleared between calls
        finally:
            peer.close()


@pytest.mark.slow
def test_bench_rows_with_both_peers():
    """Both peers through `benchmark_generate` at two batch sizes (llama.cpp opt-in), and in the
    prompt-pass table, where gptfast's row gets its ratio to llama.cpp f32."""
    pytest.importorskip("llama_cpp", reason="opt-in peer: pip install 'gptfast[peers]'")
    rows = benchmark_generate("gpt2", n_layer=1, batch_sizes=(1, 2), prompt_len=4, new_tokens=4, backends=("torch",),
                              threads=None, include_hf=False, include_reference=False,
                              ct2_types=("int8",), gguf_types=("f32", "q8_0"), read_bw_bytes=16 << 20,
                              ttft_prompts=(8, 600))
    for B in (1, 2):
        by = {r["backend"]: r for r in rows if r["batch"] == B and r["op"] == "generate"}
        for k in ("ctranslate2 int8", "llama.cpp f32", "llama.cpp q8_0"):
            assert by[k]["status"] == "ok" and by[k]["tokens_per_s"] > 0, by[k]
        assert "our GGUF f32" in by["llama.cpp f32"]["reason"]
    for P in (8, 600):  # 600 > llama.cpp's 512-token batch: its context is sized for the prompt
        t = {r["backend"]: r for r in rows if r["op"] == "ttft" and r["prompt_len"] == P}
        for k in ("engine[torch]", "ctranslate2 int8", "llama.cpp f32", "llama.cpp q8_0"):
            assert t[k]["status"] == "ok" and t[k]["ttft_ms"] > 0, t[k]
        assert t["engine[torch]"]["ttft_vs_llama_cpp"] == pytest.approx(
            t["llama.cpp f32"]["ttft_ms"] / t["engine[torch]"]["ttft_ms"])
    # the tiny preset's 65-character vocabulary cannot go to GGUF: a row with the reason
    rows = benchmark_generate("tiny", batch_sizes=(1,), prompt_len=4, new_tokens=4, backends=("torch",), threads=None,
                              include_hf=False, include_reference=False, peers=("llama.cpp",), gguf_types=("f32",),
                              read_bw_bytes=16 << 20, ttft_prompts=())
    r = next(r for r in rows if r["backend"] == "llama.cpp f32")
    assert r["status"] == "unavailable" and "vocab_size is 65, expected >= 50257" in r["reason"]


def test_progress_line_per_contestant(capsys):
    """A full generate run takes ~15 min on 2 cores: each contestant prints a line as it finishes."""
    benchmark_generate("tiny", batch_sizes=(1,), prompt_len=4, new_tokens=4, backends=("torch",), quick=True,
                       threads=None, include_hf=False, include_reference=False, peers=(), read_bw_bytes=4 << 20,
                       ttft_prompts=(4,))
    err = capsys.readouterr().err
    assert "bench generate: B=1 engine[torch]: " in err and " tok/s" in err, err
    assert "bench generate: prompt=4 engine[torch]: first token after " in err, err
