"""CLI: user errors print one clear line and exit non-zero; `info` reports config and backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gptfast.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptfast.cli", *args], capture_output=True, text=True, timeout=300
    )


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("gptfast: error")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_preset_is_one_line_error():
    _assert_one_line_error(run_cli("generate", "--preset", "gpt5"), "unknown preset 'gpt5'")


def test_missing_checkpoint_is_one_line_error(tmp_path):
    _assert_one_line_error(
        run_cli("generate", "--checkpoint", str(tmp_path / "nope")), "nope"
    )


def test_hub_name_offline_is_one_line_error(monkeypatch, tmp_path):
    # A hub name reaches the interop loader (not "file not found"); offline it says what to download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find locally
    proc = run_cli("generate", "--checkpoint", "gpt2", "--max-new-tokens", "2")
    _assert_one_line_error(proc, "openai-community/gpt2")


def test_unknown_character_in_prompt(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "héllo", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "'é'" in err and "position 1" in err


def test_info_reports_params_and_backends(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "108,352" in out
    for op in ("causal_attention", "layer_norm", "gelu_mlp", "decode_attention", "sample"):
        assert op in out
    assert "reference" in out


def test_generate_from_preset_runs(capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "To be", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be")


def test_missing_subcommand_is_usage_error():
    proc = run_cli()
    assert proc.returncode == 2 and "usage" in proc.stderr
