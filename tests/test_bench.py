"""Tests of the benchmark harness (`gptfast bench`): formulas, row arithmetic, files, MISMATCH."""

from __future__ import annotations

import datetime
import json
import math

import pytest
import torch

from gptfast.bench import cases as C
from gptfast.bench import records, runner, timing
from gptfast.cli import main


# ----------------------------------------------------------------------------- formulas, by hand


def test_attention_flops_by_hand():
    # The exact causal count: T(T+1)/2 query-key pairs, each a D-long dot in q k^T and in p v (2 FLOPs
    # per multiply-add): 4 * B * H * D * T(T+1)/2.
    # (1, 12, 1024, 64): 4 * 12 * 64 * 524,800 = 1,612,185,600 FLOPs forward.
    assert C.attention_flops(1, 12, 1024, 64) == 1_612_185_600
    assert C.attention_flops(1, 12, 1024, 64, "fwd+bwd") == 5_642_649_600  # x 3.5
    # (8, 12, 256, 64): 4 * 8 * 12 * 64 * 32,896 = 808,452,096
    assert C.attention_flops(8, 12, 256, 64) == 808_452_096
    # T = 1: one pair (the token with itself), 2 dots of D: 4 * D; T = 2: 3 pairs
    assert C.attention_flops(1, 1, 1, 64) == 256 and C.attention_flops(1, 1, 2, 64) == 768


def test_layer_norm_bytes_by_hand():
    # (8192, 768) fp32 fwd: (12,582,912 + 1,536) * 4 = 50,337,792 bytes
    assert C.layer_norm_bytes(8192, 768, 4) == 50_337_792
    # fwd+bwd: (5 * 6,291,456 + 5 * 768) * 4 = 125,844,480
    assert C.layer_norm_bytes(8192, 768, 4, "fwd+bwd") == 125_844_480
    # bf16 (2 bytes) halves it; the Case picks the element size from the dtype
    case = next(c for c in C.OPS_CASES if c.op == "layer_norm" and c.mode == "fwd")
    assert case.work(torch.bfloat16) == (None, 25_168_896)


def test_mlp_decode_sampling_by_hand():
    # 2 * 2048 * 768 * 3072 * 2 = 19,327,352,832 FLOPs forward; x3 with the backward
    assert C.mlp_flops(2048, 768, 3072) == 19_327_352_832
    assert C.mlp_flops(2048, 768, 3072, "fwd+bwd") == 57_982_058_496
    # decode B=8, cache 1024: lens 1024, 960, ..., 576 (step 1024 / 16 = 64), sum 6,400.
    assert C.decode_lens(8, 1024) == [1024, 960, 896, 832, 768, 704, 640, 576]
    # (2 * 12 * 64 * 6,400 + 2 * 8 * 12 * 64) * 4 = (9,830,400 + 12,288) * 4 = 39,370,752
    assert C.decode_bytes(8, 12, 64, C.decode_lens(8, 1024), 4) == 39_370_752
    assert C.decode_lens(1, 1024) == [1024]
    # sampling: 8 * 50,257 * 4 = 1,608,224 bytes of logits
    assert C.sampling_bytes(8, 50257, 4) == 1_608_224


def test_case_table_covers_issue_shapes():
    ids = {c.id for c in C.OPS_CASES}
    for expected in ("attention fwd B1 H12 T1024 D64", "attention fwd+bwd B8 H12 T256 D64",
                     "layer_norm fwd+bwd 8192x768", "gelu_mlp fwd 2048x(768->3072->768)",
                     "decode_attn fwd B1 H12 cache1024 D64", "decode_attn fwd B8 H12 cache1024 D64",
                     "sampling fwd B8 V50257 k50 p0.9"):
        assert expected in ids


def test_quantiles_match_numpy():
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    t = timing.summarize(xs)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.n) == pytest.approx(
        (np.percentile(xs, 50), np.percentile(xs, 20), np.percentile(xs, 80), 7))


def _fixed_timer(median_ms):
    def measure(fns, device_type, repeats=20, warmup=2):
        return {n: timing.Timing(median_ms, median_ms * 0.9, median_ms * 1.2, repeats) for n in fns}
    return measure


def test_row_arithmetic_on_known_case(monkeypatch):
    """GB/s, % of peak and speedups of a row, with the timer fixed at 0.5 ms."""
    monkeypatch.setattr(timing, "measure", _fixed_timer(0.5))
    case = C.Case("layer_norm", "layer_norm", "fwd", dict(M=64, N=32))
    peaks = dict(matmul_gflops=100.0, bw_gbps=0.0416, copy_gbps=0.04, read_gbps=0.0416)
    rows = runner.run_case(case, ["reference", "torch"], "cpu", "fp32", 3, peaks)
    # (2 * 64 * 32 + 2 * 32) * 4 = 16,640 bytes in 0.5 ms = 0.03328 GB/s = 80 % of 0.0416 GB/s
    for r in rows:
        assert r["status"] == "ok", r
        assert r["bytes"] == 16_640
        assert r["gbps"] == pytest.approx(0.03328)
        assert r["pct_peak"] == pytest.approx(80.0)
        assert r["speedup_vs_torch"] == pytest.approx(1.0)
        assert r["gflops_per_s"] is None
    attn = C.Case("causal_attention", "attention", "fwd", dict(B=1, H=2, T=16, D=8))
    rows = runner.run_case(attn, ["torch"], "cpu", "fp32", 3, peaks)
    # 4 * 2 * 8 * (16 * 17 / 2) = 8,704 FLOPs in 0.5 ms = 0.017408 GFLOP/s
    assert rows[0]["gflops_per_s"] == pytest.approx(0.017408)
    assert rows[0]["pct_peak"] == pytest.approx(0.017408)


# ----------------------------------------------------------------------------- wrong kernels


def test_wrong_backend_is_mismatch_and_not_timed(monkeypatch, capsys):
    from gptfast.ops import torch_ops

    calls = {"n": 0}
    good = torch_ops.layer_norm

    def wrong_layer_norm(x, weight, bias, eps=1e-5):  # forgets the bias
        calls["n"] += 1
        return good(x, weight, None, eps)

    monkeypatch.setattr(torch_ops, "layer_norm", wrong_layer_norm)
    timed = []
    real_measure = timing.measure

    def spy(fns, *a, **kw):
        timed.extend(fns)
        return real_measure(fns, *a, **kw)

    monkeypatch.setattr(timing, "measure", spy)
    case = C.Case("layer_norm", "layer_norm", "fwd", dict(M=32, N=48))
    rows = {r["backend"]: r for r in runner.run_case(case, ["reference", "torch"], "cpu", "fp32", 3, None)}
    assert rows["torch"]["status"] == "MISMATCH"
    assert rows["torch"]["median_ms"] is None and rows["torch"]["speedup_vs_reference"] is None
    assert "tolerance" in rows["torch"]["reason"]
    # run twice (is it trustworthy enough to join PyTorch's baseline? no; then the check), never timed
    assert calls["n"] == 2
    assert timed == ["reference"]
    assert rows["reference"]["status"] == "ok" and rows["reference"]["median_ms"] > 0
    table = records.format_table(list(rows.values()), "cpu", "t")
    assert "MISMATCH" in table


def test_wrong_sampler_is_mismatch(monkeypatch):
    from gptfast.ops import torch_ops

    def wrong_sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
        return logits.argmin(dim=-1)  # the least likely token: never in the top-k set

    monkeypatch.setattr(torch_ops, "sample", wrong_sample)
    case = C.Case("sample", "sampling", "fwd", dict(B=2, V=1000), dict(temperature=1.0, top_k=50, top_p=0.9))
    rows = {r["backend"]: r for r in runner.run_case(case, ["reference", "torch"], "cpu", "fp32", 2, None)}
    assert rows["torch"]["status"] == "MISMATCH" and rows["torch"]["median_ms"] is None
    assert "outside the top-k/top-p set" in rows["torch"]["reason"]
    assert rows["reference"]["status"] == "ok"


def test_half_precision_tolerance_does_not_trust_the_torch_backend(monkeypatch):
    """The 2x-baseline rule uses the reference in the same dtype, not the backend under test."""
    from gptfast.ops import torch_ops

    monkeypatch.setattr(torch_ops, "causal_attention", lambda q, k, v, scale=None, dropout_p=0.0: q.clone())
    case = C.Case("causal_attention", "attention", "fwd", dict(B=1, H=2, T=16, D=8))
    rows = {r["backend"]: r for r in runner.run_case(case, ["reference", "torch"], "cpu", "bf16", 2, None)}
    assert rows["torch"]["status"] == "MISMATCH"
    assert rows["reference"]["status"] == "ok"


def test_fused_torch_error_counts_as_pytorch_own_but_a_wrong_one_does_not(monkeypatch):
    """PyTorch's fused op joins the 2x baseline only while its error is rounding-sized (TORCH_TRUST)."""
    from gptfast.ops import torch_ops

    case = C.Case("layer_norm", "layer_norm", "fwd", dict(M=16, N=32))
    inputs = C.build_inputs(case, torch.float32, "cpu", seed=0)
    refs = C.reference_outputs(case, inputs)
    assert [len(b) for b in C.tolerance(case, inputs, refs)] == [2]  # composite + fused
    good = torch_ops.layer_norm
    monkeypatch.setattr(torch_ops, "layer_norm", lambda x, w, b, eps=1e-5: good(x, w, b, eps) * 1.01)
    assert [len(b) for b in C.tolerance(case, inputs, refs)] == [1]  # 1 % off: not PyTorch's rounding


def test_unavailable_backend_is_listed_with_reason():
    case = C.Case("layer_norm", "layer_norm", "fwd", dict(M=8, N=16))
    rows = {r["backend"]: r for r in runner.run_case(case, ["triton"], "cpu", "fp32", 2, None)}
    assert rows["triton"]["status"] == "unavailable"
    assert "GPU" in rows["triton"]["reason"]


# ----------------------------------------------------------------------------- end to end


def _check_history_schema(path):
    lines = path.read_text().splitlines()
    assert lines
    for line in lines:
        row = json.loads(line)
        missing = set(records.META_KEYS + records.ROW_KEYS) - set(row)
        assert not missing, missing
        assert row["status"] in records.STATUSES
        datetime.datetime.fromisoformat(row["timestamp"])
        assert isinstance(row["threads"], int) and isinstance(row["cores"], int)
        assert isinstance(row["git_sha"], str) and row["git_sha"]
        assert row["command"].startswith("gptfast bench ")
        assert isinstance(row["torch"], str) and isinstance(row["cpu"], str)
        for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "gflops_per_s", "pct_peak"):
            assert row[k] is None or isinstance(row[k], float), (k, row[k])
        if row["status"] == "ok" and row["suite"].startswith("ops"):
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert (row["gbps"] is None) != (row["gflops_per_s"] is None)
        if row["status"] != "ok":
            assert row["reason"]
    return [json.loads(x) for x in lines]


def test_bench_ops_quick_end_to_end(tmp_path, capsys):
    # `native` is left out of the default run: its first use JIT-builds the C++ extension, which
    # can take a minute; the slow test below runs every backend.
    out = tmp_path / "res"
    argv = ["bench", "ops", "--quick", "--device", "cpu", "--threads", "1", "--repeats", "3",
            "--backends", "reference,torch,triton", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "median ms (p20/p80)" in text and "4*B*H*D*T(T+1)/2" in text and "machine peaks" in text
    rows = _check_history_schema(out / "history.jsonl")
    ops_rows = [r for r in rows if r["suite"] == "ops"]
    assert {r["case"] for r in ops_rows} == {c.id for c in C.QUICK_OPS_CASES}
    assert {r["backend"] for r in ops_rows} == {"reference", "torch", "triton"}
    # the references and torch run everywhere; a backend that cannot run says why
    for r in ops_rows:
        if r["backend"] in ("reference", "torch"):
            assert r["status"] == "ok", r
        if r["backend"] == "triton":
            assert r["status"] == "unavailable" and r["reason"]
    assert any(r["suite"] == "ops-scaling" for r in rows)
    (json_path,) = out.glob("ops-*.json")
    doc = json.loads(json_path.read_text())
    assert doc["peaks"]["matmul_gflops"] > 0 and doc["peaks"]["copy_gbps"] > 0
    assert json_path.with_suffix(".csv").read_text().startswith("timestamp,")
    for png in (out.glob("ops-*-speedup.png"), out.glob("ops-*-attention-scaling.png")):
        (p,) = png
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_from_saved_json(tmp_path):
    """Plots are drawn from the JSON alone (a separate step)."""
    meta = records.machine_meta("cpu", "fp32", "gptfast bench ops")
    rows = [records.new_row("ops", op="layer_norm", mode="fwd", shape="8x16", case="ln", backend=b,
                            median_ms=t, p20_ms=t, p80_ms=t) for b, t in (("reference", 2.0), ("torch", 1.0))]
    runner.add_speedups(rows)
    scaling = [records.new_row("ops-scaling", backend=b, T=T, median_ms=T * T * f)
               for b, f in (("reference", 1e-4), ("torch", 1e-5)) for T in (128, 256)]
    json_path, _ = records.save_run(tmp_path, "ops", meta, rows, None, scaling)
    assert main(["bench", "plot", "--from", str(json_path)]) == 0
    assert (tmp_path / (json_path.stem + "-speedup.png")).exists()
    assert (tmp_path / (json_path.stem + "-attention-scaling.png")).exists()


def test_generate_suite_import_error_is_not_swallowed(tmp_path, monkeypatch, capsys):
    # A broken gptfast.bench.generate is a bug: it must surface as one (traceback + "internal
    # error", exit 1), not become a "not available" row.
    import sys

    monkeypatch.setitem(sys.modules, "gptfast.bench.generate", None)  # import raises ImportError
    assert main(["bench", "generate", "--out", str(tmp_path), "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "gptfast.bench.generate" in err and "internal error" in err
    assert not list(tmp_path.glob("generate-*.json"))


def test_generate_suite_calls_benchmark_generate(tmp_path, capsys, monkeypatch):
    """The CLI passes its arguments to benchmark_generate (imported directly, no reflection) and
    prints its table (format_rows: decoding rows, then the prompt-pass rows)."""
    from gptfast.bench import generate as bg

    seen = {}

    def fake(**kw):
        seen.update(kw)
        dec = dict(op="generate", shape="gpt2 B=1", batch=1, status="ok", reason="")
        return [dict(dec, backend="engine[torch]", tokens_per_s=2560.0, ms_per_token=0.39, median_ms=0.39,
                     speedup_vs_hf=2.0),
                dict(dec, backend="bound", tokens_per_s=3000.0, ms_per_token=0.33),
                dict(op="ttft", shape="gpt2 B=1 prompt=16 -> first token", backend="engine[torch]", batch=1,
                     status="ok", reason="", prompt_len=16, ttft_ms=12.5, ttft_vs_llama_cpp=1.25)]

    monkeypatch.setattr(bg, "benchmark_generate", fake)
    assert main(["bench", "generate", "--quick", "--backends", "torch,native", "--threads", "1",
                 "--out", str(tmp_path), "--no-plot"]) == 0
    assert seen == dict(device="cpu", dtype="fp32", backends=["torch", "native"], quick=True, threads=1,
                        repeats=1, seed=0)
    out = capsys.readouterr().out
    assert "2560.0" in out and "2.00" in out and "TTFT ms" in out and "12.5" in out and "1.25" in out
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["generate", "generate", "ttft"] and rows[2]["ttft_ms"] == 12.5


def test_bench_train_short(tmp_path, capsys):
    assert main(["bench", "train", "--steps", "4", "--backends", "reference,torch,triton",
                 "--out", str(tmp_path), "--no-plot"]) == 0
    rows = {r["backend"]: r for r in _check_history_schema(tmp_path / "history.jsonl")}
    assert rows["triton"]["status"] == "unavailable"
    for b in ("reference", "torch"):
        assert rows[b]["status"] == "ok", rows[b]
        assert rows[b]["tokens_per_s"] == pytest.approx(12 * 64 / (rows[b]["median_ms"] * 1e-3))
        assert math.isfinite(rows[b]["loss"]) and rows[b]["loss"] < math.log(65) + 0.5
    # same seed, same batches: the backends train the same model up to rounding
    assert abs(rows["torch"]["loss_vs_reference"]) < 1e-3
    assert "ms" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--backends", "torch,cudnn"], "--backends"),
    (["--device", "cuda"], "no CUDA device"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bench_bad_arguments(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "ops", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_all_quick_every_backend(tmp_path, capsys):
    """`gptfast bench all --quick` with the default backends (native's build included)."""
    assert main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 0
    rows = _check_history_schema(tmp_path / "history.jsonl")
    assert {r["suite"] for r in rows} >= {"ops", "ops-scaling", "generate", "train"}
    assert {r["backend"] for r in rows if r["suite"] == "ops"} == set(runner.BACKENDS)


def test_triton_gpu_script_smoke_uses_the_bench_formulas(tmp_path):
    """`python -m gptfast.bench.triton_gpu --smoke` (CPU self-test): its throughput is the bench's
    work formula over the median time (one FLOP formula, one harness), rows checked vs fp64."""
    from gptfast.bench import triton_gpu

    out = tmp_path / "tg.json"
    assert triton_gpu.main(["--smoke", "--ops", "attention", "decode_attention", "--providers", "torch",
                            "reference", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["smoke"] is True and doc["meta"]["git_sha"]
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["results"]}
    B, H, T, D = 1, 2, 33, 16
    for mode in ("fwd", "fwd+bwd"):
        r = rows[("causal_attention", mode, "torch")]
        assert r["shape"] == [B, H, T, D]
        assert r["rate"] == pytest.approx(C.attention_flops(B, H, T, D, mode) / (r["ms_median"] * 1e-3) / 1e12)
    assert rows[("causal_attention", "fwd", "torch")]["accuracy"] == "ok"
    r = rows[("decode_attention", "fwd", "torch")]
    B, H, T_max, D, Tq = r["shape"]
    lens = [T_max * 3 // 4 if i % 2 == 0 else T_max for i in range(B)]  # the script's ragged batch
    assert r["rate"] == pytest.approx(C.decode_bytes(B, H, D, lens, 2, Tq) / (r["ms_median"] * 1e-3) / 1e9)
