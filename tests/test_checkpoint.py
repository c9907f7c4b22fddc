"""Checkpoints: round trip, atomic writes (a failure or a kill mid-write keeps the old checkpoint),
corruption detection, and safe loading (no arbitrary unpickling)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gptfast import checkpoint as ckpt
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", **kw))


def _assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def test_round_trip(tmp_path):
    m = _model()
    tok = ckpt.default_tokenizer()
    state = {"iter_num": 7, "x": torch.arange(5), "nested": {"a": [1.5, None, "s"]}}
    d = ckpt.save_checkpoint(tmp_path / "c", m, tok, train_state=state, history=[{"step": 1}],
                             step=7, val_loss=1.25)
    m2, tok2, info = ckpt.load_checkpoint(d)
    _assert_same_weights(m, m2)
    assert m2.lm_head.weight is m2.transformer.wte.weight  # tying survives the round trip
    assert not m2.training
    assert tok2 == tok
    assert info["step"] == 7 and info["val_loss"] == 1.25
    assert set(info["files"]) == {ckpt.WEIGHTS_NAME, ckpt.TRAIN_STATE_NAME, ckpt.HISTORY_NAME}
    st = ckpt.load_train_state(d)
    assert st["iter_num"] == 7 and torch.equal(st["x"], torch.arange(5))
    assert st["nested"] == {"a": [1.5, None, "s"]}
    # The tied head is stored once.
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(d / ckpt.WEIGHTS_NAME))


def test_untied_round_trip(tmp_path):
    m = _model(tie_weights=False)
    d = ckpt.save_checkpoint(tmp_path / "c", m, ckpt.default_tokenizer())
    m2, _, _ = ckpt.load_checkpoint(d / ckpt.WEIGHTS_NAME)  # a path to the weights file works too
    _assert_same_weights(m, m2)


def test_old_format_without_hashes_loads(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer())
    info = json.loads((d / ckpt.META_NAME).read_text())
    del info["files"]
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    ckpt.load_checkpoint(d)


@pytest.mark.parametrize("fail_at", [ckpt.WEIGHTS_NAME, "swap"])
def test_failure_mid_write_keeps_old_checkpoint(tmp_path, fail_at):
    d = tmp_path / "c"
    old = _model(seed=1)
    ckpt.save_checkpoint(d, old, ckpt.default_tokenizer(), train_state={"iter_num": 1}, step=1)
    (d / "loss.png").write_bytes(b"keep me")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(d, _model(seed=2), ckpt.default_tokenizer(),
                             train_state={"iter_num": 2}, step=2, _fail_after=fail_at)
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert after == before
    m, _, info = ckpt.load_checkpoint(d)
    _assert_same_weights(m, old)
    assert info["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"], "temporary directory left behind"


def test_save_keeps_other_files_and_replaces_stale_ones(tmp_path):
    d = tmp_path / "c"
    ckpt.save_checkpoint(d, _model(1), ckpt.default_tokenizer(), train_state={"iter_num": 1})
    (d / "loss.png").write_bytes(b"png")
    ckpt.save_checkpoint(d, _model(2), ckpt.default_tokenizer())  # no train state this time
    assert (d / "loss.png").read_bytes() == b"png"
    assert not (d / ckpt.TRAIN_STATE_NAME).exists(), "a stale train state must not survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_recovers_from_kill_between_renames(tmp_path):
    """The one window where the target is missing: renamed to the backup, new one not yet in."""
    d = tmp_path / "c"
    m = _model(3)
    ckpt.save_checkpoint(d, m, ckpt.default_tokenizer())
    os.replace(d, tmp_path / ".c.old-abc123")
    m2, _, _ = ckpt.load_checkpoint(d)
    _assert_same_weights(m, m2)
    assert d.is_dir()


def test_sigkill_mid_write_never_leaves_a_broken_checkpoint(tmp_path):
    """A process saving in a loop is SIGKILLed at an arbitrary moment: the checkpoint left behind
    loads and is one complete version (all weights filled with the same version number)."""
    d = tmp_path / "c"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from gptfast import checkpoint as ckpt
        from gptfast.config import GPTConfig
        from gptfast.model import GPT
        m = GPT(GPTConfig.from_preset("tiny"))
        tok = ckpt.default_tokenizer()
        i = 0
        while True:
            with torch.no_grad():
                for p in m.parameters():
                    p.fill_(float(i))
            ckpt.save_checkpoint({str(d)!r}, m, tok, train_state={{"i": torch.full((20000,), i)}}, step=i,
                                 git_sha=None)  # skip the git subprocess: more saves per second
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # Wait until a few saves are done, then kill at a moment not aligned with a save.
        for _ in range(3):
            assert proc.stdout.readline(), "the saving process died"
        time.sleep(0.137)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    m, _, info = ckpt.load_checkpoint(d)
    version = info["step"]
    for name, p in m.state_dict().items():
        assert torch.all(p == float(version)), f"{name} is not from version {version}"
    assert torch.equal(ckpt.load_train_state(d)["i"], torch.full((20000,), version))


def test_truncated_weights_detected(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer())
    w = d / ckpt.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupted checkpoint"):
        ckpt.load_checkpoint(d)
    # Without the recorded hash, safetensors' own header check still catches it.
    info = json.loads((d / ckpt.META_NAME).read_text())
    del info["files"]
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="corrupted checkpoint"):
        ckpt.load_checkpoint(d)


def test_flipped_byte_detected(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer())
    w = d / ckpt.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses
    w.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(d)


def test_bad_json_and_missing_files(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer(), train_state={"a": 1})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope")
    (d / ckpt.META_NAME).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_checkpoint(d)
    (d / ckpt.META_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=ckpt.META_NAME):
        ckpt.load_checkpoint(d)


def test_truncated_train_state_detected(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer(),
                             train_state={"t": torch.zeros(1000)})
    p = d / ckpt.TRAIN_STATE_NAME
    p.write_bytes(p.read_bytes()[:100])
    info = json.loads((d / ckpt.META_NAME).read_text())
    del info["files"]  # get past the hash check to the torch.load itself
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_train_state(d)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_train_state_never_unpickles_objects(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer(), train_state={"a": 1})
    p = d / ckpt.TRAIN_STATE_NAME
    torch.save({"evil": _Evil()}, p)
    info = json.loads((d / ckpt.META_NAME).read_text())
    info["files"][ckpt.TRAIN_STATE_NAME] = ckpt._sha256(p)  # a consistent, malicious checkpoint
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_train_state(d)


def test_weights_not_matching_config(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), CharTokenizer("ab"))
    info = json.loads((d / ckpt.META_NAME).read_text())
    info["config"]["n_embd"] = 128
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="do not match its config"):
        ckpt.load_checkpoint(d)
