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


# ----------------------------------------------------------------------------- issue #19: errors, help


def _subparsers():
    import argparse

    from gptfast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_has_help_and_shows_its_default():
    """`--help` documents every flag and shows its default (train had ~20 flags with neither)."""
    missing = []
    for name, p in _subparsers().items():
        text = p.format_help()
        for action in p._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            flag = action.option_strings[-1]
            if not action.help:
                missing.append(f"{name} {flag}: no help")
                continue
            shown = p.formatter_class(prog="x")._get_help_string(action)
            if "default" not in shown.lower():
                missing.append(f"{name} {flag}: no default shown")
        assert "(default:" in text or "default" in text
    assert not missing, "\n".join(missing)


def _assert_user_error(proc, needle):
    """One line `gptfast: error: ...` naming the problem, exit 2, nothing on stdout, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "", f"stdout before the error: {proc.stdout!r}"
    # (a first use after a source change may also announce the native build on stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("gptfast: building the native")]
    assert len(lines) == 1 and lines[0].startswith("gptfast: error:") and needle in lines[0], proc.stderr


def test_checkpoint_that_is_a_text_file(tmp_path):
    """Was `gptfast: error: 105` (a KeyError from the unpickler)."""
    readme = tmp_path / "readme.txt"
    readme.write_text("hello\n")
    _assert_user_error(run_cli("generate", "--checkpoint", str(readme), "--max-new-tokens", "1"),
                       f"{readme}: not a checkpoint gptfast knows")


def test_gptfast_json_without_n_layer(tmp_path):
    """Was silently n_layer=12 (the dataclass default) plus kilobytes of missing keys."""
    import json

    from gptfast.io import checkpoint as ckpt
    from gptfast.config import GPTConfig
    from gptfast.model import GPT

    d = ckpt.save_checkpoint(tmp_path / "c", GPT(GPTConfig.from_preset("tiny")), ckpt.default_tokenizer())
    info = json.loads((d / ckpt.META_NAME).read_text())
    del info["config"]["n_layer"]
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    _assert_user_error(run_cli("generate", "--checkpoint", str(d), "--max-new-tokens", "1"),
                       "config lacks required field(s) n_layer")


def test_unavailable_backend_is_one_line(monkeypatch):
    """`--backend triton` where Triton cannot run (no CUDA, no interpreter) was a
    BackendUnavailableError traceback."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gptfast.cli", "generate", "--backend", "triton",
                           "--max-new-tokens", "2", "--prompt", "hi"], capture_output=True, text=True,
                          timeout=300, env=env)
    _assert_user_error(proc, "backend 'triton' is not available on cpu")


def test_non_utf8_prompt_file_names_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    _assert_user_error(run_cli("generate", "--prompt-file", str(bad), "--max-new-tokens", "1"),
                       f"--prompt-file {bad} is not UTF-8")


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--overflow", "error", "--max-new-tokens", "500"], "block_size"),
])
def test_bad_generate_request_prints_nothing_first(args, needle):
    """--temperature inf / --overflow error used to print the prompt, then fail."""
    _assert_user_error(run_cli("generate", "--prompt", "To be", *args), needle)


def test_internal_error_keeps_traceback_and_says_how_to_report(monkeypatch, capsys):
    """A bug (here a KeyError inside the command) is not dressed up as a user error: the
    traceback stays and the message says it is gptfast's bug (before, any KeyError / ValueError
    became `gptfast: error: ...`, exit 2)."""
    import gptfast.cli as cli
    import gptfast.cli.info

    def buggy(args):
        return {}["oops"]

    monkeypatch.setattr(gptfast.cli.info, "run", buggy)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'oops'" in err and "bug in gptfast" in err
    assert "gptfast: error:" not in err
