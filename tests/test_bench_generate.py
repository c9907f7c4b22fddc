"""`gptfast.bench.generate`: the rows of the generation benchmark (decoding and the prompt pass),
on the tiny preset (the arithmetic of the bound and the peers: tests/test_bench_peers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptfast.bench import generate as bg
from gptfast.bench import records


def _rows(**kw):
    args = dict(batch_sizes=(2,), prompt_len=4, new_tokens=6, backends=("torch",), quick=True, threads=None,
                reference_tokens=2, peers=(), read_bw_bytes=16 << 20, ttft_prompts=(8,))
    args.update(kw)
    return bg.benchmark_generate("tiny", **args)


def test_rows_schema_decoding_and_prompt_pass():
    rows = _rows(ttft_prompts=(8, 64))  # tiny's block size is 64: a 64-token prompt + 1 does not fit
    dec = [r for r in rows if r["op"] == "generate"]
    by = {r["backend"]: r for r in dec}
    assert set(by) >= {"engine[torch]", "hf", "reference (no cache)", "bound"}
    for r in dec:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0
    # "vs HF" is against the fastest Hugging Face configuration (mask / no mask / static cache)
    base = [r for r in rows if r.get("hf_baseline")]
    assert len(base) == 1 and base[0]["backend"].startswith("hf") and base[0]["speedup_vs_hf"] == 1.0
    assert all(r["speedup_vs_hf"] <= 1.0 for r in dec if r["backend"].startswith("hf"))
    assert 0 < by["engine[torch]"]["pct_of_bound"]
    # the prompt pass: one row per contestant for the 8-token prompt, one 'unavailable' for 64
    ttft = [r for r in rows if r["op"] == "ttft"]
    t8 = {r["backend"]: r for r in ttft if r["prompt_len"] == 8}
    assert set(t8) == {"engine[torch]", "hf"}
    for r in t8.values():
        assert r["status"] == "ok" and r["ttft_ms"] > 0 and r["batch"] == 1 and r["new_tokens"] == 1, r
        assert r.get("tokens_per_s") is None and r.get("pct_of_bound") is None  # not decoding rows
    t64 = [r for r in ttft if r["prompt_len"] == 64]
    assert len(t64) == 1 and t64[0]["status"] == "unavailable"
    assert "a 64-token prompt and its first token exceed the block size 64" in t64[0]["reason"]
    # both table writers take every row; format_rows puts the prompt pass in its own table
    text = bg.format_rows(rows)
    assert "engine[torch]" in text and "TTFT ms" in text and "prompt=8 -> first token" in text
    assert text.index("TTFT ms") > text.index("reference (no cache)")
    assert "engine[torch]" in records.format_table(rows, "cpu", "generate")
    # the JSON row keeps every bandwidth method's best reading, start and end
    assert all(by["bound"][f"read_{w}_{m}_gbps"] > 0 for w in ("start", "end") for m in ("sum", "gemv", "numpy"))

    # Hugging Face with its static cache: every contestant gets its ratio to it
    rows = _rows(include_reference=False, hf_static=True, variants=False, ttft_prompts=())
    by = {r["backend"]: r for r in rows}
    assert not [r for r in rows if r["op"] == "ttft"]
    assert by["hf (static cache)"]["status"] == "ok" and by["hf (static cache)"]["speedup_vs_hf_static"] == 1.0
    assert by["engine[torch]"]["speedup_vs_hf_static"] == pytest.approx(
        by["engine[torch]"]["tokens_per_s"] / by["hf (static cache)"]["tokens_per_s"])
    assert "vs HF static" in bg.format_rows(rows)
    assert "vs HF static" not in bg.format_rows([{k: v for k, v in r.items() if k != "speedup_vs_hf_static"}
                                                 for r in rows])
    with pytest.raises(ValueError, match=r"ttft_prompts must be positive lengths, got \(0,\)"):
        _rows(ttft_prompts=(0,))


def test_prompt_pass_peers_absent_rows_with_reason(monkeypatch):
    """A peer that is not installed: its decoding and prompt-pass rows are there, 'unavailable',
    with the reason (pip install ...)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("ctranslate2", "llama_cpp") else real(name, *a))
    rows = _rows(batch_sizes=(1,), include_hf=False, include_reference=False, peers=("ctranslate2", "llama.cpp"),
                 ct2_types=("int8",), gguf_types=("f32",))
    for op in ("generate", "ttft"):
        by = {r["backend"]: r for r in rows if r["op"] == op}
        assert by["engine[torch]"]["status"] == "ok"
        assert by["ctranslate2 int8"]["status"] == "unavailable"
        assert "ctranslate2 is not installed (pip install ctranslate2" in by["ctranslate2 int8"]["reason"]
        assert by["llama.cpp f32"]["status"] == "unavailable"
        assert "llama_cpp is not installed (pip install llama-cpp-python" in by["llama.cpp f32"]["reason"]
    assert "unavailable: llama_cpp is not installed" in bg.format_rows(rows)


def test_no_peer_is_alive_while_another_contestant_runs(monkeypatch):
    """A peer left alive slowed the next contestant (a CTranslate2 generator that had run once cost
    gptfast's batch-8 decoding 15 % in the same process): every peer runner is created for its own
    rows and closed before anything else is timed, in decoding and in the prompt pass."""
    import gptfast
    import gptfast.gguf

    live: list[object] = []
    made: list[str] = []

    class Fake:
        version = "fake"

        def __init__(self, kind, *a, **k):
            assert not live, f"a {kind} runner was created while {live} is alive"
            live.append(self)
            made.append(kind)

        def generate(self, prompts, n):
            return [[0] * n for _ in prompts]

        def close(self):
            live.remove(self)

    real_generate = gptfast.generate

    def engine_generate(*a, **k):
        assert not live, f"a gptfast contestant ran while the peer {live} was alive"
        return real_generate(*a, **k)

    monkeypatch.setattr(bg, "peer_unavailable", lambda name: None)
    monkeypatch.setattr(bg, "hf_dir_for_peers", lambda model, d: (d, []))
    monkeypatch.setattr(bg, "CT2Peer", lambda *a, **k: Fake("ctranslate2"))
    monkeypatch.setattr(bg, "LlamaCppPeer", lambda *a, **k: Fake("llama.cpp"))
    monkeypatch.setattr(gptfast.gguf, "save_gguf", lambda model, path, dtype=None: Path(path).write_bytes(b""))
    monkeypatch.setattr(gptfast, "generate", engine_generate)
    rows = _rows(batch_sizes=(1, 2), include_reference=False, peers=("ctranslate2", "llama.cpp"),
                 ct2_types=("float32", "int8"), gguf_types=("f32",), quick=False, new_tokens=3, repeats=1)
    assert not live
    peer_rows = [r for r in rows if r["backend"].startswith(("ctranslate2", "llama.cpp"))]
    assert len(peer_rows) == 3 * 2 + 3 and all(r["status"] == "ok" for r in peer_rows), peer_rows
    assert len(made) == len(peer_rows)  # one runner per use


def test_bf16_dot_rows_run_the_arithmetic_they_name(monkeypatch):
    """A caller's GPTFAST_BF16_DOT=1 must not turn the plain bf16 rows into bf16-dot ones: every
    engine call runs with the variable its row names ("0" / "1"), and the caller's value is
    restored after the run."""
    import gptfast

    seen: list[tuple[str, str | None]] = []
    real_generate = gptfast.generate

    def spy(model, *a, **k):
        seen.append((getattr(model, "weight_format", None) or "fp32", os.environ.get("GPTFAST_BF16_DOT")))
        return real_generate(model, *a, **k)

    monkeypatch.setenv("GPTFAST_BF16_DOT", "1")
    monkeypatch.setattr(gptfast, "generate", spy)
    rows = _rows(batch_sizes=(1,), backends=("native",), include_hf=False, include_reference=False)
    assert os.environ["GPTFAST_BF16_DOT"] == "1"
    bf16 = [env for fmt, env in seen if fmt == "bf16"]
    assert "0" in bf16  # the plain bf16 rows (and the fp32 comparison runs beside them)
    names = {r["backend"] for r in rows}
    assert "engine[native] bf16 weights" in names and "engine[native] bf16 weights, bf16 dot" in names
    from gptfast.bench.generate import _has_avx512_bf16

    if _has_avx512_bf16():
        assert "1" in bf16


def test_prompt_pass_ctranslate2_row():
    """CTranslate2 (installed with the test extras) in the prompt-pass table, same first token."""
    rows = _rows(batch_sizes=(1,), include_hf=False, include_reference=False, peers=("ctranslate2",),
                 ct2_types=("float32",))
    r = next(r for r in rows if r["op"] == "ttft" and r["backend"] == "ctranslate2 float32")
    assert r["status"] == "ok" and r["ttft_ms"] > 0 and "generate_batch(max_length=1)" in r["reason"], r
    assert r["weights"] == "float32"


def test_ttft_ratio_to_llama_cpp_same_weight_bytes():
    """ttft_vs_llama_cpp = the fastest llama.cpp prompt pass of the same length at the same weight
    bytes / the row's time: fp32 against f32 only, bf16 against the faster of f16 and bf16."""
    def r(backend, weights, ms, P=16):
        return dict(op="ttft", backend=backend, weights=weights, ttft_ms=ms, prompt_len=P)

    rows = [r("engine[auto]", "fp32", 40.0), r("engine[auto] bf16 weights", "bf16", 25.0),
            r("llama.cpp f32", "f32", 50.0), r("llama.cpp f16", "f16", 30.0), r("llama.cpp bf16", "bf16", 20.0),
            r("llama.cpp q8_0", "q8_0", 10.0), r("llama.cpp f32", "f32", 400.0, P=512),
            r("engine[auto]", "fp32", 500.0, P=512), r("ctranslate2 float32", "float32", 35.0)]
    bg._ttft_ratios(rows)
    assert rows[0]["ttft_vs_llama_cpp"] == pytest.approx(50.0 / 40.0)
    assert rows[1]["ttft_vs_llama_cpp"] == pytest.approx(20.0 / 25.0)
    assert rows[7]["ttft_vs_llama_cpp"] == pytest.approx(400.0 / 500.0)
    assert all("ttft_vs_llama_cpp" not in x for x in rows[2:7] + rows[8:])


def test_bf16_weights_row_native():
    """native (or auto) on CPU fp32: also weight-only bf16 (gptfast.quantize of a copy), held to its
    own halved weight bytes, decoding and prompt pass; the fp32 model is left as it was."""
    rows = _rows(batch_sizes=(1,), backends=("native",), include_hf=False, include_reference=False)
    by = {r["backend"]: r for r in rows if r["op"] == "generate"}
    r16 = by["engine[native] bf16 weights"]
    assert r16["status"] == "ok" and r16["tokens_per_s"] > 0 and r16["pct_of_bound"] > 0, r16
    assert r16["weight_format"] == "bf16"  # what generate() ran: the quantized copy
    assert "greedy = fp32 engine for the first" in r16["reason"]
    assert not any("python step" in r["backend"] for r in rows)  # no module global flipped
    ratio = lambda r: r["pct_of_bound"] / r["tokens_per_s"]  # noqa: E731
    n = rows[0]["weight_bytes"]
    kv = 2 * 2 * 64 * (4 + 6 / 2) * 4  # tiny: 2 layers x 64 wide, fp32 K/V at the mean length
    # its own bytes: bf16 matrices (and tied embedding), fp32 vectors; the position table is read a row at a time
    import copy

    from gptfast import GPT, GPTConfig, quantize
    from gptfast.quantize import weight_bytes

    m = GPT(GPTConfig.from_preset("tiny", dropout=0.0))
    wpe = m.transformer.wpe.weight.numel() * 4
    assert n == weight_bytes(m) - wpe
    for fmt, r in (("bf16", r16), ("int8-g32", by["engine[native] int8-g32 weights"])):
        q = weight_bytes(quantize(copy.deepcopy(m), fmt)) - wpe
        assert q < n * (0.52 if fmt == "bf16" else 0.3)  # vectors stay fp32
        assert ratio(r) / ratio(by["engine[native]"]) == pytest.approx((q + kv) / (n + kv), rel=1e-9), fmt
        assert r["status"] == "ok" and r["weights"] == fmt and r["weight_format"] == fmt, r
    t = {r["backend"]: r for r in rows if r["op"] == "ttft"}
    assert t["engine[native] bf16 weights"]["status"] == "ok" and t["engine[native] bf16 weights"]["weights"] == "bf16"
    # int8 formats also with the named option act_int8 (llama.cpp q8_0 x q8_0's arithmetic), same bytes
    ra, ta = by["engine[native] int8-g32 weights, act_int8"], t["engine[native] int8-g32 weights, act_int8"]
    assert ra["status"] == "ok" and ra["weights"] == "int8-g32" and "act_int8: activations quantized" in ra["reason"], ra
    assert ratio(ra) == pytest.approx(ratio(by["engine[native] int8-g32 weights"]), rel=1e-9)
    assert ta["status"] == "ok" and ta["weights"] == "int8-g32", ta
    # the named bf16-dot option (llama.cpp bf16's arithmetic): timed where the CPU has avx512_bf16,
    # else a row saying why; the environment variable is restored either way
    from gptfast.bench.generate import _has_avx512_bf16

    rd = by["engine[native] bf16 weights, bf16 dot"]
    if _has_avx512_bf16():
        assert rd["status"] == "ok" and "GPTFAST_BF16_DOT=1" in rd["reason"], rd
    else:
        assert rd["status"] == "unavailable" and "avx512_bf16" in rd["reason"], rd
    td = t["engine[native] bf16 weights, bf16 dot"]  # the prompt pass with the option too
    if _has_avx512_bf16():
        assert td["status"] == "ok" and td["weights"] == "bf16" and "GPTFAST_BF16_DOT=1" in td["reason"], td
    else:
        assert td["status"] == "unavailable" and "avx512_bf16" in td["reason"], td
    assert "GPTFAST_BF16_DOT" not in os.environ


@pytest.mark.slow
def test_compiled_row():
    """The compiled-engine contestant (on by default on CUDA) runs and is timed; on CPU it is
    inductor, slow to compile, hence `slow`."""
    rows = _rows(batch_sizes=(1,), include_hf=False, include_reference=False, compiled_too=True, ttft_prompts=())
    by = {r["backend"]: r for r in rows}
    assert by["engine[torch] compiled"]["status"] == "ok" and by["engine[torch] compiled"]["tokens_per_s"] > 0
