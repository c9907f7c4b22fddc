"""Quantized checkpoints (issue #20): save / load in every format (packed weights + scales in
safetensors, "weight_format" in gptfast.json), refusal of a file whose tensors do not fit the
format, and the CLI: `gptfast quantize` then `gptfast generate --checkpoint OUT`, and
`gptfast generate --quantize FORMAT`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import gptfast
from gptfast.config import GPTConfig
from gptfast.errors import CheckpointError
from gptfast.io import default_tokenizer, load, load_checkpoint, save_checkpoint
from gptfast.io.checkpoint import checkpoint_path
from gptfast.model import GPT
from gptfast.quantize import FORMATS, QuantEmbedding, QuantLinear, quantize


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", n_embd=128, n_head=4, **kw), backend="torch").eval()


def _idx():
    return torch.randint(0, 65, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("head", [True, False], ids=["head", "nohead"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_load_round_trip(tmp_path, fmt, head):
    q = quantize(_model(), fmt, head=head)
    save_checkpoint(tmp_path / "q", q, default_tokenizer(), step=3)
    info = json.loads((tmp_path / "q" / "gptfast.json").read_text())
    assert info["weight_format"] == fmt and info["quantized_head"] is head
    back, tok, _ = load_checkpoint(tmp_path / "q")
    assert back.weight_format == fmt and back.quantized_head is head
    want, got = q.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert type(back.lm_head) is type(q.lm_head) and type(back.transformer.wte) is type(q.transformer.wte)
    if head and fmt != "bf16":
        assert back.transformer.wte.tied_to is back.lm_head
    back.backend = "torch"
    with torch.no_grad():
        assert torch.equal(back(_idx())[0], q(_idx())[0])


def test_tied_head_is_stored_once(tmp_path):
    q = quantize(_model(), "int4-g32")
    save_checkpoint(tmp_path / "q", q, default_tokenizer())
    from gptfast.io._weights import safetensors_shapes

    shapes = safetensors_shapes(checkpoint_path(tmp_path / "q"))
    assert shapes["lm_head.qweight"] == (65, 64) and shapes["lm_head.scale"] == (65, 4)
    assert not any("wte" in k for k in shapes)
    assert not any(k.endswith(".weight") and k.count(".") > 2 and "ln" not in k for k in shapes)  # no dense matrix


def test_untied_model_round_trip(tmp_path):
    q = quantize(_model(tie_weights=False), "int8")
    save_checkpoint(tmp_path / "q", q, default_tokenizer())
    back, _, _ = load_checkpoint(tmp_path / "q")
    assert isinstance(back.transformer.wte, QuantEmbedding) and back.transformer.wte.tied_to is None
    assert torch.equal(back.transformer.wte.qweight, q.transformer.wte.qweight)


def test_io_load_returns_the_quantized_model(tmp_path):
    q = quantize(_model(), "int8-g32")
    save_checkpoint(tmp_path / "q", q, default_tokenizer())
    model, tok = load(tmp_path / "q")
    assert model.weight_format == "int8-g32" and isinstance(model.lm_head, QuantLinear)
    assert gptfast.generate(model, [[1, 2, 3]], 5, temperature=0.0) == gptfast.generate(q, [[1, 2, 3]], 5, temperature=0.0)
    m2 = gptfast.io.from_pretrained(tmp_path / "q", backend="reference")
    assert m2.weight_format == "int8-g32" and m2.lm_head.backend == "reference"


def _rewrite(d, mutate_state=None, mutate_info=None):
    """Change a saved checkpoint's tensors / manifest, keeping its sha256 consistent."""
    import hashlib

    from safetensors.torch import load_file, save_file

    info = json.loads((d / "gptfast.json").read_text())
    path = checkpoint_path(d)
    if mutate_state is not None:
        state = load_file(str(path))
        mutate_state(state)
        save_file(state, str(path))
        info["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    if mutate_info is not None:
        mutate_info(info)
    (d / "gptfast.json").write_text(json.dumps(info))


def test_tensors_that_do_not_fit_the_format_are_refused(tmp_path):
    q = quantize(_model(), "int8-g32")
    d = save_checkpoint(tmp_path / "q", q, default_tokenizer())
    # a float32 scale where the format stores float16 (load_state_dict would convert it silently)
    _rewrite(d, mutate_state=lambda s: s.__setitem__("lm_head.scale", s["lm_head.scale"].float()))
    with pytest.raises(CheckpointError, match=r"lm_head.scale is torch.float32 \(65, 4\) but the config and "
                                              r"weight format need torch.float16 \(65, 4\)"):
        load_checkpoint(d)
    d2 = save_checkpoint(tmp_path / "q2", q, default_tokenizer())
    _rewrite(d2, mutate_info=lambda i: i.__setitem__("weight_format", "int4-g32"))  # packed shapes differ
    with pytest.raises(CheckpointError, match=r"lm_head.qweight is torch.int8 \(65, 128\) but .* need torch.uint8 \(65, 64\)"):
        load_checkpoint(d2)
    _rewrite(d2, mutate_info=lambda i: i.__setitem__("weight_format", "int3"))
    with pytest.raises(CheckpointError, match=r"weight_format must be one of .* got 'int3'"):
        load_checkpoint(d2)
    _rewrite(d2, mutate_info=lambda i: (i.__setitem__("weight_format", "int8-g32"), i.__setitem__("quantized_head", "yes")))
    with pytest.raises(CheckpointError, match="quantized_head must be true or false, got 'yes'"):
        load_checkpoint(d2)
    # a plain manifest over quantized tensors
    _rewrite(d2, mutate_info=lambda i: (i.pop("weight_format"), i.pop("quantized_head")))
    with pytest.raises(CheckpointError):
        load_checkpoint(d2)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "gptfast.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("gptfast: error")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_quantize_then_generate(tmp_path):
    out = tmp_path / "q8"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the output directory: left alone
    p = run_cli("quantize", "--format", "int8", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "quantizing to int8" in p.stderr and "wrote" in p.stdout and "smaller" in p.stdout
    assert (out / "notes.txt").read_text() == "mine"
    g = run_cli("generate", "--checkpoint", str(out), "--max-new-tokens", "40", "--temperature", "0",
                "--prompt", "ROMEO:")
    assert g.returncode == 0, g.stderr
    assert "weights int8" in g.stderr
    # the same text as quantizing the embedded model in the command
    g2 = run_cli("generate", "--quantize", "int8", "--max-new-tokens", "40", "--temperature", "0",
                 "--prompt", "ROMEO:")
    assert g2.returncode == 0, g2.stderr
    assert g.stdout == g2.stdout and len(g.stdout) > 40
    assert "weights int8 (1.9 MB of weights, was 7.3 MB)" in g2.stderr  # the memory saved
    # and the model in Python
    model, tok = gptfast.io.default_model()
    ids = tok.encode("ROMEO:")
    want = gptfast.generate(quantize(model, "int8"), [ids], 40, temperature=0.0)[0]
    assert g.stdout == tok.decode(ids + want) + "\n"
    # errors: one line each, nothing replaced
    before = sorted(x.name for x in out.iterdir())
    _one_line_error(run_cli("quantize", "--format", "int4-g32", "--out", str(out)), "--overwrite")
    _one_line_error(run_cli("quantize", "--checkpoint", str(out), "--format", "int4-g32", "--out", str(out)),
                    "is the input checkpoint's directory")
    _one_line_error(run_cli("generate", "--checkpoint", str(out), "--dtype", "bf16"),
                    "holds int8 weights with fp32 activations")
    _one_line_error(run_cli("generate", "--checkpoint", str(out), "--quantize", "int4-g32"), "already in format int8")
    _one_line_error(run_cli("quantize", "--format", "int4-g128", "--out", str(tmp_path / "g128")),
                    "divisible by 128")
    assert sorted(x.name for x in out.iterdir()) == before


def test_cli_quantize_overwrite_and_no_head(tmp_path):
    out = tmp_path / "q"
    assert run_cli("quantize", "--format", "int8", "--out", str(out)).returncode == 0
    p = run_cli("quantize", "--format", "int4-g32", "--no-head", "--overwrite", "--out", str(out))
    assert p.returncode == 0, p.stderr
    model, _ = load(out)
    assert model.weight_format == "int4-g32" and model.quantized_head is False
    assert type(model.lm_head).__name__ == "Linear"
