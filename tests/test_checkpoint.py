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

from gptfast.io import checkpoint as ckpt
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", **kw))


def _tree(d: Path) -> dict[str, bytes | str | int]:
    """Everything under `d` (recursively): file bytes, directory modes."""
    out: dict[str, bytes | str | int] = {".": os.stat(d).st_mode}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = p.read_bytes() if p.is_file() else os.stat(p).st_mode
    return out


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
    assert set(info["files"]) == {"model-7.safetensors", "train_state-7.pt", "history-7.json"}
    assert sorted(p.name for p in d.iterdir()) == sorted([*info["files"], ckpt.META_NAME])
    st = ckpt.load_train_state(d)
    assert st["iter_num"] == 7 and torch.equal(st["x"], torch.arange(5))
    assert st["nested"] == {"a": [1.5, None, "s"]}
    # The tied head is stored once.
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(ckpt.checkpoint_path(d)))


def test_untied_round_trip(tmp_path):
    m = _model(tie_weights=False)
    d = ckpt.save_checkpoint(tmp_path / "c", m, ckpt.default_tokenizer())
    m2, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(d))  # a path to the weights file works too
    _assert_same_weights(m, m2)


def test_old_format_without_hashes_loads(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer())
    info = json.loads((d / ckpt.META_NAME).read_text())
    del info["files"]
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    ckpt.load_checkpoint(d)


@pytest.mark.parametrize("fail_at", ["weights", "train_state", "history", "manifest"])
def test_failure_mid_write_keeps_old_checkpoint(tmp_path, fail_at):
    """A save that fails at any stage leaves the directory byte for byte as it was: the old
    checkpoint, the user's files, and nothing of the failed save (no temporary file, no journal)."""
    d = tmp_path / "c"
    old = _model(seed=1)
    ckpt.save_checkpoint(d, old, ckpt.default_tokenizer(), train_state={"iter_num": 1}, step=1)
    (d / "loss.png").write_bytes(b"keep me")
    before = _tree(d)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(d, _model(seed=2), ckpt.default_tokenizer(), train_state={"iter_num": 2},
                             history=[{"step": 2}], step=2, _fail_after=fail_at)
    assert _tree(d) == before
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
    assert "train_state" not in ckpt.checkpoint_files(ckpt.read_checkpoint_info(d))
    assert not list(d.glob("train_state*")), "a stale train state must not survive"
    with pytest.raises(FileNotFoundError, match="no train_state"):
        ckpt.load_train_state(d)
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
        from gptfast.io import checkpoint as ckpt
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
    w = ckpt.checkpoint_path(d)
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
    w = ckpt.checkpoint_path(d)
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
    p = ckpt.checkpoint_path(d, "train_state")
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
    p = ckpt.checkpoint_path(d, "train_state")
    torch.save({"evil": _Evil()}, p)
    info = json.loads((d / ckpt.META_NAME).read_text())
    info["files"][p.name] = ckpt._sha256(p)  # a consistent, malicious checkpoint
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_train_state(d)


def test_weights_not_matching_config(tmp_path):
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), CharTokenizer("ab"))
    info = json.loads((d / ckpt.META_NAME).read_text())
    info["config"]["n_embd"] = 128
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    with pytest.raises(ckpt.CheckpointError, match="n_embd is 128 but .* has 64 columns of wte.weight"):
        ckpt.load_checkpoint(d)


# ----------------------------------------------------------------------------- the out-dir is the user's


def test_save_never_touches_user_files_subdirs_or_mode(tmp_path):
    """Issue #19: saving into a project directory deleted its subdirectories (the whole directory
    was swapped) and changed its mode (555 -> 755). Now: every user file and subdirectory
    survives two saves byte for byte, the directory keeps its mode and inode (never renamed),
    and the only other entries are the checkpoint's own files."""
    d = tmp_path / "proj"
    (d / "src").mkdir(parents=True)
    (d / "src" / "main.py").write_text("code")
    (d / "notes" / "sub").mkdir(parents=True)
    (d / "notes" / "sub" / "data.txt").write_text("data")
    (d / "model.safetensors.bak").write_bytes(b"user bytes")
    os.chmod(d / "notes", 0o700)
    os.chmod(d, 0o555)  # root can still write into it; the mode bits must stay as they are
    try:
        user = _tree(d)
        ino = os.stat(d).st_ino
        for step in (1, 2):
            ckpt.save_checkpoint(d, _model(step), ckpt.default_tokenizer(), train_state={"i": step},
                                 history=[{"step": step}], step=step)
            after = _tree(d)
            ours = set(ckpt.checkpoint_files(ckpt.read_checkpoint_info(d)).values()) | {ckpt.META_NAME}
            assert {k: v for k, v in after.items() if k not in ours} == user
            assert set(after) - set(user) == ours
            assert os.stat(d).st_ino == ino, "the directory was replaced"
        m, _, info = ckpt.load_checkpoint(d)
        _assert_same_weights(m, _model(2))
        assert ckpt.load_train_state(d)["i"] == 2 and ckpt.read_history(d) == [{"step": 2}]
    finally:
        os.chmod(d, 0o755)


def test_save_into_a_mount_point(tmp_path, monkeypatch):
    """A mount point cannot be renamed (EBUSY): the old save failed there every time. Stand-in
    for a mount: renaming, removing or re-permissioning the directory itself raises EBUSY /
    EPERM, so any save that still tries fails this test."""
    import errno

    d = (tmp_path / "mnt").absolute()
    d.mkdir()
    real_replace, real_rename, real_rmdir, real_chmod = os.replace, os.rename, os.rmdir, os.chmod

    def guard(real, err):
        def f(src, *rest, **kw):
            if Path(src).absolute() == d or (rest and isinstance(rest[0], (str, os.PathLike))
                                             and Path(rest[0]).absolute() == d and real is not real_chmod):
                raise OSError(err, os.strerror(err), str(src))
            return real(src, *rest, **kw)
        return f

    monkeypatch.setattr(os, "replace", guard(real_replace, errno.EBUSY))
    monkeypatch.setattr(os, "rename", guard(real_rename, errno.EBUSY))
    monkeypatch.setattr(os, "rmdir", guard(real_rmdir, errno.EBUSY))
    monkeypatch.setattr(os, "chmod", guard(real_chmod, errno.EPERM))
    for step in (1, 2):
        ckpt.save_checkpoint(d, _model(step), ckpt.default_tokenizer(), train_state={"i": step}, step=step)
    m, _, info = ckpt.load_checkpoint(d)
    _assert_same_weights(m, _model(2))
    assert info["step"] == 2


def test_previous_format_still_loads_and_is_replaced_cleanly(tmp_path):
    """A checkpoint in the previous format (the shipped model is one: model.safetensors,
    history.json) loads; a save into it removes exactly its old files and keeps the user's."""
    import shutil

    legacy = ckpt.DEFAULT_MODEL_DIR
    assert (legacy / ckpt.WEIGHTS_NAME).exists() and "layout" not in ckpt.read_checkpoint_info(legacy)
    m, _, info = ckpt.load_checkpoint(legacy)
    assert info["step"] == 1500
    d = tmp_path / "old"
    shutil.copytree(legacy, d)
    (d / "mine.txt").write_text("keep")
    ckpt.save_checkpoint(d, _model(5), ckpt.default_tokenizer(), step=9)
    assert sorted(p.name for p in d.iterdir()) == sorted([ckpt.META_NAME, "model-9.safetensors", "mine.txt"])
    m2, _, _ = ckpt.load_checkpoint(d)
    _assert_same_weights(m2, _model(5))


def test_crafted_manifest_cannot_delete_outside(tmp_path):
    """The files a save removes are the ones the previous manifest names: a manifest naming
    ../victim or the manifest itself must not make a save delete them."""
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer(), step=1)
    (tmp_path / "victim").write_text("x")
    info = json.loads((d / ckpt.META_NAME).read_text())
    info["layout"]["history"] = "../victim"
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    ckpt.save_checkpoint(d, _model(), ckpt.default_tokenizer(), step=2)
    assert (tmp_path / "victim").read_text() == "x"


def test_same_step_saved_twice_gets_a_fresh_name(tmp_path):
    d = tmp_path / "c"
    ckpt.save_checkpoint(d, _model(1), ckpt.default_tokenizer(), step=3)
    ckpt.save_checkpoint(d, _model(2), ckpt.default_tokenizer(), step=3)
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([ckpt.META_NAME, "model-3-1.safetensors"]), names
    _assert_same_weights(ckpt.load_checkpoint(d)[0], _model(2))


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from gptfast.io import checkpoint as ckpt
    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    m = GPT(GPTConfig.from_preset("tiny"))
    tok = ckpt.default_tokenizer()
    i = 0
    while True:
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(i))
        ckpt.save_checkpoint(sys.argv[2], m, tok, train_state={"i": torch.full((20000,), i)},
                             history=[{"step": i}], step=i, git_sha=None)
        print(i, flush=True)
        i += 1
""")


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_points_leaves_a_loadable_checkpoint(tmp_path, seed):
    """A process saving in a loop into a directory with user files is SIGKILLed at a random
    moment (4 seeds): the checkpoint left loads and is one complete version (weights, train
    state and history all from it); the user's files are intact; the only other entries are
    ours (a journal, temporary files with our prefix, files the journal names); and the next
    save removes all of those."""
    import random

    d = tmp_path / "c"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "keep.txt").write_text("user")
    (d / "notes.md").write_text("user notes")
    user = _tree(d)
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline(), "the saving process died"
        time.sleep(random.Random(seed).uniform(0.0, 0.4))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    m, _, info = ckpt.load_checkpoint(d)
    version = info["step"]
    for name, p in m.state_dict().items():
        assert torch.all(p == float(version)), f"{name} is not from version {version}"
    assert torch.equal(ckpt.load_train_state(d)["i"], torch.full((20000,), version))
    assert ckpt.read_history(d) == [{"step": version}]
    live = set(ckpt.checkpoint_files(info).values()) | {ckpt.META_NAME}
    tree = _tree(d)
    assert {k: v for k, v in tree.items() if k in user} == user
    journal = d / ckpt._PENDING_NAME
    pending = set()
    if journal.exists():
        try:
            j = json.loads(journal.read_text())
            pending = set(j.get("files", [])) | set(j.get("old", []))
        except json.JSONDecodeError:  # cut short while being written: nothing else exists yet
            pass
    for name in set(tree) - set(user) - live:
        assert name == ckpt._PENDING_NAME or name.startswith(ckpt._TMP_PREFIX) or name in pending, name
    ckpt.save_checkpoint(d, _model(), ckpt.default_tokenizer(), step=version + 1)
    live = set(ckpt.checkpoint_files(ckpt.read_checkpoint_info(d)).values()) | {ckpt.META_NAME}
    assert set(_tree(d)) == set(user) | live


WRITER_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[1])
    import safetensors.torch
    from gptfast.io import checkpoint as ckpt
    from gptfast.io import save_pretrained
    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    real = safetensors.torch.save_file
    def writer_killed_midway(tensors, path, metadata=None):
        # safetensors >= 0.7 writes its own `.tmpXXXXXX` beside `path`, then renames it; a kill
        # in between leaves that name. Simulate exactly that moment.
        real(tensors, path, metadata=metadata)
        os.replace(path, os.path.join(os.path.dirname(path), ".tmpKILLED"))
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = writer_killed_midway
    m = GPT(GPTConfig.from_preset("tiny"))
    if sys.argv[3] == "checkpoint":
        ckpt.save_checkpoint(sys.argv[2], m, ckpt.default_tokenizer(), step=5, git_sha=None)
    else:
        save_pretrained(m, sys.argv[2])
""")


@pytest.mark.parametrize("kind", ["checkpoint", "save_pretrained"])
def test_a_writers_own_temporary_never_lands_in_the_users_directory(tmp_path, kind):
    """safetensors' save_file makes its own temporary file (`.tmpXXXXXX`) beside the path it is
    given. A process killed while that file exists must not leave it in the user's directory
    (nothing could tell it from a user's file afterwards): it must sit inside an entry with our
    prefix, and for checkpoints the next save removes every such entry."""
    d = tmp_path / "c"
    d.mkdir()
    (d / "notes.md").write_text("user notes")
    if kind == "checkpoint":
        ckpt.save_checkpoint(d, _model(1), ckpt.default_tokenizer(), step=1)
    before = _tree(d)
    script = tmp_path / "saver.py"
    script.write_text(WRITER_KILL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(REPO), str(d), kind], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    after = _tree(d)
    assert {k: v for k, v in after.items() if k in before} == before
    top = {k.split("/")[0] for k in set(after) - set(before)}
    strays = {n for n in top if not (n.startswith(ckpt._TMP_PREFIX) or n == ckpt._PENDING_NAME)}
    assert not strays, f"left in the user's directory: {strays}"
    assert any(k.endswith(".tmpKILLED") for k in after), "the simulated writer did not run"
    if kind == "checkpoint":
        _assert_same_weights(ckpt.load_checkpoint(d)[0], _model(1))
        ckpt.save_checkpoint(d, _model(2), ckpt.default_tokenizer(), step=2)
        live = set(ckpt.checkpoint_files(ckpt.read_checkpoint_info(d)).values()) | {ckpt.META_NAME}
        assert set(_tree(d)) == {".", "notes.md"} | live


def test_interrupted_save_leftovers_removed_by_next_save(tmp_path):
    """Deterministic version of the kill window: the journal is written and a new weights file
    is in place, but the manifest is not committed. The old checkpoint loads; the next save
    removes the orphan (named in the journal) and never a file the journal does not name."""
    d = tmp_path / "c"
    ckpt.save_checkpoint(d, _model(1), ckpt.default_tokenizer(), step=1)
    (d / "model-7.safetensors").write_bytes(b"the user's own, not in any journal")
    (d / "model-2.safetensors").write_bytes(b"orphan of a killed save")
    (d / f"{ckpt._TMP_PREFIX}abc123-history-2.json").write_text("[]")
    (d / ckpt._PENDING_NAME).write_text(json.dumps({"token": "abc123", "files": ["model-2.safetensors"]}))
    _assert_same_weights(ckpt.load_checkpoint(d)[0], _model(1))
    ckpt.save_checkpoint(d, _model(3), ckpt.default_tokenizer(), step=3)
    assert sorted(p.name for p in d.iterdir()) == sorted([ckpt.META_NAME, "model-3.safetensors", "model-7.safetensors"])


# ----------------------------------------------------------------------------- checks before allocating


@pytest.mark.parametrize("field, value, needle", [
    ("n_layer", 100000, "gptfast.json: config field n_layer is 100,000, above the sane limit"),
    ("n_layer", 1000, "n_layer is 1,000 but .* has 2 transformer block"),
    ("vocab_size", 10**9, "vocab_size is 1,000,000,000, above the sane limit"),
    ("block_size", 4096, "block_size is 4,096 but .* has 64 rows of wpe.weight"),
    ("n_layer", None, "lacks required field.* n_layer"),
    ("n_embd", "64", "n_embd must be a positive integer, got '64'"),
])
def test_implausible_config_refused_before_allocating(tmp_path, field, value, needle):
    """Issue #19: n_layer 100000 next to a tiny weights file allocated for minutes before
    failing; a missing n_layer silently defaulted to 12. Now refused in well under a second,
    naming the field."""
    d = ckpt.save_checkpoint(tmp_path / "c", _model(), ckpt.default_tokenizer())
    info = json.loads((d / ckpt.META_NAME).read_text())
    if value is None:
        del info["config"][field]
    else:
        info["config"][field] = value
    (d / ckpt.META_NAME).write_text(json.dumps(info))
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError, match=needle):
        ckpt.load_checkpoint(d)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("n_layer, needle", [(100000, "n_layer is 100,000, above the sane limit"),
                                             (1000, "n_layer is 1,000 but the state dict has 2 transformer")])
def test_hf_dir_with_implausible_config_refused_fast(tmp_path, n_layer, needle):
    """Issue #19's case: a Hugging Face config.json with n_layer 100000 beside a tiny
    model.safetensors took 260-490 s to refuse. Now under a second, naming the field."""
    from gptfast.io import load, save_pretrained

    d = save_pretrained(_model(), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = n_layer
    (d / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError, match=needle):
        load(d)
    assert time.perf_counter() - t0 < 1.0


def test_save_pretrained_keeps_the_directorys_other_files(tmp_path):
    """`interop.save_pretrained` swapped the whole directory too, deleting e.g. a tokenizer or a
    README beside config.json. Now only its two files are replaced; mode and inode unchanged."""
    from gptfast.io import from_pretrained, save_pretrained

    d = tmp_path / "hf"
    (d / "sub").mkdir(parents=True)
    (d / "tokenizer.json").write_text("{}")
    (d / "sub" / "notes.md").write_text("mine")
    os.chmod(d, 0o750)
    user, ino = _tree(d), os.stat(d).st_ino
    for seed in (1, 2):
        save_pretrained(_model(seed), d)
    tree = _tree(d)
    assert {k: v for k, v in tree.items() if k not in ("config.json", "model.safetensors")} == user
    assert set(tree) - set(user) == {"config.json", "model.safetensors"}
    assert os.stat(d).st_ino == ino
    _assert_same_weights(from_pretrained(d), _model(2))
