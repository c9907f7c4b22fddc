"""What the weight formats cost in accuracy (issue #20), with bounds set from the measurement
(gptfast.bench.quant_accuracy; README "Quantized weights"): on the shipped Shakespeare model,
validation perplexity within 0.5 % of fp32 for int8 and 3 % for int4-g32 (the issue's targets;
measured on 16,384 validation characters: int8 -0.01 %, int4-g32 +0.43 %), and greedy agreement
with fp32 over 200 tokens; (slow) on a random GPT-2 124M, the mean KL divergence of the next-token
distributions vs fp32."""

from __future__ import annotations

import pytest
import torch

from gptfast.bench import quant_accuracy as qa


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine (see tests/test_engine.py)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shakespeare_rows(shakespeare_path):
    from gptfast.io import default_model

    model, tok = default_model()
    text = shakespeare_path.read_text(encoding="utf-8")
    rows = qa.shakespeare_rows(model, tok, text, rows=("fp32", "int8", "int4-g32"), heads=(True,),
                               n_val=4096, offsets=(0,))
    return {r["format"]: r for r in rows}


def test_shipped_model_perplexity_within_the_issue_bounds(shakespeare_rows):
    r = shakespeare_rows
    assert r["fp32"]["ppl"] < 5.0  # the trained model (a broken baseline would make ratios meaningless)
    assert abs(r["int8"]["ppl_change_pct"]) <= 0.5, r["int8"]  # the issue's targets
    assert abs(r["int4-g32"]["ppl_change_pct"]) <= 3.0, r["int4-g32"]
    # and from the measurement (this slice: int8 +0.00 %, int4-g32 +0.55 %): ~3x. An int4 scale
    # twice too large (max / -4, three bits' worth of levels) measured +2.6 %: inside the issue's
    # 3 %, caught here.
    assert abs(r["int8"]["ppl_change_pct"]) <= 0.1, r["int8"]
    assert abs(r["int4-g32"]["ppl_change_pct"]) <= 1.5, r["int4-g32"]
    # int4 costs something: a format silently left in fp32 would show +0.00 %
    assert r["int4-g32"]["ppl_change_pct"] > 0.05, r["int4-g32"]


def test_shipped_model_greedy_agreement_over_200_tokens(shakespeare_rows):
    r = shakespeare_rows
    assert r["int8"]["gen_tokens"] == 200
    # teacher-forced (fp32's tokens fed to both; measured 100 % / 91 % on this prompt, 99-100 % /
    # ~90 % over three prompts): int8 picks fp32's token nearly everywhere, int4-g32 mostly
    assert r["int8"]["forced_agreement"] >= 0.97, r["int8"]
    assert r["int4-g32"]["forced_agreement"] >= 0.80, r["int4-g32"]
    # free-running: int8 stays on fp32's text for a long stretch
    assert r["int8"]["first_difference"] >= 50, r["int8"]
    # the weights' bytes: int8 about a quarter of fp32, int4-g32 about a sixth
    assert r["int8"]["bytes"] < 0.3 * r["fp32"]["bytes"] and r["int4-g32"]["bytes"] < 0.17 * r["fp32"]["bytes"]


def test_agreement_helpers():
    assert qa.agreement([[1, 2, 3, 4]], [[1, 2, 5, 4]]) == (0.75, 2.0)
    assert qa.agreement([[1, 2]], [[1, 2]]) == (1.0, 2.0)


@pytest.mark.slow
def test_gpt2_124m_kl_divergence(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    rows = {r["format"]: r for r in qa.kl_rows(text, rows=("fp32", "bf16", "int8", "int8-g32", "int4-g32",
                                                            "int4-g32-zp"), heads=(True,))}
    assert rows["fp32"]["kl_mean"] == 0.0
    for fmt, bound in KL_BOUNDS.items():
        assert rows[fmt]["kl_mean"] <= bound, (fmt, rows[fmt])
    assert rows["int8"]["kl_mean"] < rows["int4-g32"]["kl_mean"]  # more bits, closer


# mean KL (nats / token) bounds: ~3x the values measured (README table), seed 0, 1024 tokens
# (measured: bf16 3.9e-6, int8 8.5e-5, int8-g32 3.7e-5, int4-g32 9.4e-3, int4-g32-zp 7.8e-3)
KL_BOUNDS = {"bf16": 1.2e-5, "int8": 2.5e-4, "int8-g32": 1.2e-4, "int4-g32": 3e-2, "int4-g32-zp": 2.5e-2}


def test_bench_suite_passes_its_flags(monkeypatch, tmp_path):
    """`gptfast bench quant-accuracy --quick --out DIR` runs this module with a smoke configuration."""
    from gptfast.cli import main

    seen = []
    monkeypatch.setattr(qa, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "quant-accuracy", "--quick", "--threads", "1", "--out", str(tmp_path / "r")]) == 0
    argv = seen[0]
    assert argv[argv.index("--formats") + 1] == "fp32,int8,int4-g32" and argv[argv.index("--threads") + 1] == "1"
    assert argv[argv.index("--out") + 1].startswith(str(tmp_path / "r" / "quant_accuracy-"))


def test_quant_accuracy_main_writes_the_table(tmp_path, capsys, shakespeare_path, monkeypatch):
    monkeypatch.setenv("GPTFAST_SHAKESPEARE", str(shakespeare_path))
    out = tmp_path / "acc.json"
    assert qa.main(["--only", "shakespeare", "--formats", "int8", "--head", "quantized", "--n-val", "512",
                    "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| int8 | quantized |" in text and "| fp32 | - |" in text
    import json

    rows = json.loads(out.read_text())["shakespeare"]
    assert [r["format"] for r in rows] == ["fp32", "int8"]
