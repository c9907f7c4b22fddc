"""Training: LR schedule, weight-decay groups, loss goes down, exact resume, plots, bad input,
DDP with two CPU processes, and the shipped Shakespeare model's validation loss."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptfast.io import checkpoint as ckpt
from gptfast.cli import main as cli_main
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.train import TrainConfig, get_lr, param_groups, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread avoids OpenMP synchronisation, which dominates (and
    collapses on a shared, oversubscribed machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, shakespeare_path) -> Path:
    """The first 40,000 characters of Tiny Shakespeare (36k train / 4k val tokens)."""
    p = tmp_path_factory.mktemp("data") / "small.txt"
    p.write_text(shakespeare_path.read_text()[:40_000])
    return p


def _tiny_cfg(data, out_dir, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out_dir), preset="tiny", max_iters=20, eval_interval=10,
                eval_iters=2, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_iters=5, backend="torch",
                progress=False, seed=123, model_overrides={"n_layer": 1, "n_embd": 32, "block_size": 32})
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- pieces


def test_lr_schedule_values():
    # lr=1, min_lr=0.1, warmup 10, decay until 110; values worked out by hand:
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, **kw) == pytest.approx(1 / 11)  # warmup: lr * (it + 1) / (warmup + 1)
    assert get_lr(9, **kw) == pytest.approx(10 / 11)
    assert get_lr(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert get_lr(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))  # a quarter: cos(pi/4)
    assert get_lr(60, **kw) == pytest.approx(0.55)  # half way: (lr + min_lr) / 2
    assert get_lr(110, **kw) == pytest.approx(0.1)
    assert get_lr(500, **kw) == pytest.approx(0.1)  # after the decay: min_lr
    # no warmup
    assert get_lr(0, lr=2.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=4) == pytest.approx(2.0)
    assert get_lr(2, lr=2.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=4) == pytest.approx(1.0)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_linear_matrices(tie):
    model = GPT(GPTConfig.from_preset("tiny", tie_weights=tie))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    # Independently: the weight matrices of the Linear layers in the blocks (+ the head if untied).
    expected = sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ) + ([] if tie else ["lm_head.weight"])
    assert decayed == sorted(expected)
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.wte.weight" in not_decayed and "transformer.wpe.weight" in not_decayed
    assert all(p.dim() == 1 for p in no_decay["params"] if names[id(p)] not in
               ("transformer.wte.weight", "transformer.wpe.weight"))
    # every parameter exactly once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- training


def test_loss_decreases_and_plot(small_text, tmp_path):
    out = tmp_path / "run"
    res = train(_tiny_cfg(small_text, out, max_iters=60, eval_interval=30, eval_iters=4, plot=True))
    vocab = res["model"].config.vocab_size
    hist = ckpt.read_history(out)
    assert [h["step"] for h in hist] == [30, 60]
    # Untrained, the loss is ~ln(vocab) (uniform predictions); 60 steps must beat it clearly.
    assert hist[-1]["train_loss"] < math.log(vocab) - 0.7
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved checkpoint is what training ended with.
    m, _, info = ckpt.load_checkpoint(out)
    assert info["step"] == 60 and info["val_loss"] == hist[-1]["val_loss"]
    for k, v in res["model"].state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    # `gptfast train --plot` without --data re-plots an existing run.
    (out / "loss.png").unlink()
    assert cli_main(["train", "--plot", "--out-dir", str(out)]) == 0
    assert (out / "loss.png").exists()


def test_resume_is_exact(small_text, tmp_path):
    """20 steps straight == 10 steps, resume, 10 more: same weights and optimizer state, bit for
    bit (CPU fp32). Dropout and gradient accumulation are on so their RNG / state must be saved;
    the runs evaluate at different steps, which must not change the trajectory."""
    kw = dict(max_iters=20, lr_decay_iters=20, grad_accum=2,
              model_overrides={"n_layer": 1, "n_embd": 32, "block_size": 32, "dropout": 0.2})
    a = train(_tiny_cfg(small_text, tmp_path / "a", eval_interval=7, **kw))
    train(_tiny_cfg(small_text, tmp_path / "b", eval_interval=5, **{**kw, "max_iters": 10}))
    b = train(_tiny_cfg(small_text, tmp_path / "b", eval_interval=5, resume=True, **kw))
    assert b["step"] == 20
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume (max diff {(sa[k] - sb[k]).abs().max()})"
    oa = ckpt.load_train_state(tmp_path / "a")["optimizer"]["state"]
    ob = ckpt.load_train_state(tmp_path / "b")["optimizer"]["state"]
    for i in oa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[i][key], ob[i][key])
    # ...and not merely because nothing trained: b differs from its step-10 state.
    assert b["history"][-1]["step"] == 20


def test_resume_without_checkpoint_and_overrides_mismatch(small_text, tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli_main(["train", "--preset", "tiny", "--data", str(small_text), "--out-dir", str(out), "--resume"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err
    train(_tiny_cfg(small_text, out, max_iters=2, eval_interval=2))
    rc = cli_main(["train", "--preset", "tiny", "--data", str(small_text), "--out-dir", str(out),
                   "--resume", "--n-layer", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "n_layer=1" in err and "n_layer=3" in err


# ----------------------------------------------------------------------------- bad input (CLI)


def _dir_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())} if d.exists() else {}


@pytest.fixture
def trained(small_text, tmp_path) -> Path:
    out = tmp_path / "ok"
    train(_tiny_cfg(small_text, out, max_iters=2, eval_interval=2))
    return out


def _run_cli_error(args, capsys) -> str:
    rc = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gptfast: error:"), err
    return err


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("short", "too short"),
    ("batch0", "batch_size"),
    ("block0", "block_size"),
    ("preset", "unknown preset"),
    ("bf16_cpu", "CUDA only"),
    ("vocab", "vocabulary"),
    ("corrupt", "corrupted checkpoint"),
    ("truncated_state", "corrupted checkpoint"),
])
def test_bad_input_one_line_error_nothing_overwritten(case, expected, trained, tmp_path, small_text, capsys):
    data = small_text
    extra: list[str] = []
    preset = "tiny"
    if case == "missing":
        data = tmp_path / "does-not-exist.txt"
    elif case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "short":
        data = tmp_path / "short.txt"
        data.write_text("To be, or not to be: that is the question." * 3)  # val split < block
    elif case == "batch0":
        extra = ["--batch-size", "0"]
    elif case == "block0":
        extra = ["--block-size", "0"]
    elif case == "preset":
        preset = "gpt5"
    elif case == "bf16_cpu":
        extra = ["--dtype", "bf16"]
    elif case == "vocab":  # resume a char model on text with a character it never saw
        data = tmp_path / "accents.txt"
        data.write_text("Café au lait, señor! " * 400)
        extra = ["--resume"]
    elif case == "corrupt":
        w = ckpt.checkpoint_path(trained)
        w.write_bytes(w.read_bytes()[:-100])
        extra = ["--resume"]
    elif case == "truncated_state":
        s = ckpt.checkpoint_path(trained, "train_state")
        s.write_bytes(s.read_bytes()[:50])
        extra = ["--resume"]
    before = _dir_digest(trained)
    err = _run_cli_error(["train", "--preset", preset, "--data", str(data), "--out-dir", str(trained),
                          "--max-iters", "4", "--backend", "torch", "--no-progress", *extra], capsys)
    assert expected in err, err
    assert _dir_digest(trained) == before, "a failed run must not touch the existing checkpoint"


def test_train_and_resume_keep_the_users_files(small_text, tmp_path, capsys):
    """Issue #19: `gptfast train --out-dir .` in a project deleted src/main.py, and --resume
    deleted notes/sub/data.txt. Both survive now, with the directory's mode; --resume says the
    step and losses it resumed from."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('hi')")
    (proj / "notes" / "sub").mkdir(parents=True)
    (proj / "notes" / "sub" / "data.txt").write_text("data")
    os.chmod(proj, 0o751)
    args = ["train", "--preset", "tiny", "--data", str(small_text), "--out-dir", str(proj),
            "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
            "--block-size", "32", "--n-layer", "1", "--n-embd", "32", "--backend", "torch", "--no-progress"]
    assert cli_main(args) == 0
    i = args.index("--max-iters") + 1
    assert cli_main([*args[:i], "4", *args[i + 1:], "--resume"]) == 0
    err = capsys.readouterr().err
    info = ckpt.read_checkpoint_info(proj)
    assert info["step"] == 4
    assert "resumed from step 2" in err and "val loss" in err, err
    assert (proj / "src" / "main.py").read_text() == "print('hi')"
    assert (proj / "notes" / "sub" / "data.txt").read_text() == "data"
    assert os.stat(proj).st_mode & 0o7777 == 0o751


def test_progress_lines_when_stderr_is_not_a_terminal(small_text, tmp_path, capsys):
    """In a log (stderr not a TTY, as under capsys) training prints a line every log_interval
    steps instead of a carriage-return tqdm bar that a log shows as one endless line."""
    train(_tiny_cfg(small_text, tmp_path / "p", max_iters=6, eval_interval=6, log_interval=2, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [l.split(":")[0] for l in err.splitlines() if "ms/iter" in l] == ["step 2", "step 4", "step 6"], err


@pytest.mark.parametrize("case", ["file", "parent_file", "not_writable"])
def test_bad_out_dir_refused_before_training(case, small_text, tmp_path, capsys, monkeypatch):
    """--out-dir that is a file, under a file, or not writable: one line, exit 2, before any data
    is read or any step is run (the old code failed at the first save, after training)."""
    import gptfast.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("training started before --out-dir was checked")

    monkeypatch.setattr(train_mod, "_prepare", no_training)
    target = tmp_path / "out"
    if case == "file":
        target.write_text("a file")
    elif case == "parent_file":
        (tmp_path / "f").write_text("a file")
        target = tmp_path / "f" / "out"
    else:  # root ignores permission bits: stand in for a read-only directory at the probe
        target.mkdir()

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(train_mod.tempfile, "mkstemp", refuse)
    err = _run_cli_error(["train", "--preset", "tiny", "--data", str(small_text), "--out-dir", str(target),
                          "--max-iters", "2", "--no-progress"], capsys)
    expected = {"file": "exists and is not a directory", "parent_file": "is a file, not a directory",
                "not_writable": "not writable"}[case]
    assert "--out-dir" in err and expected in err, err


def test_plot_without_history_is_an_error(tmp_path, capsys):
    err = _run_cli_error(["train", "--plot", "--out-dir", str(tmp_path / "none")], capsys)
    assert "no eval history" in err


# ----------------------------------------------------------------------------- distributed


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from safetensors.torch import save_file
    from gptfast.train import TrainConfig, train
    torch.set_num_threads(1)
    cfg = TrainConfig(data=sys.argv[2], out_dir=sys.argv[3], preset="tiny", max_iters=12,
                      eval_interval=6, eval_iters=2, batch_size=4, lr=3e-3, warmup_iters=2,
                      backend="torch", progress=False, seed=5,
                      model_overrides={"n_layer": 1, "n_embd": 32, "block_size": 32, "dropout": 0.1})
    res = train(cfg)
    rank = int(os.environ["RANK"])
    sd = {k: v.contiguous() for k, v in res["model"].state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(sys.argv[4], f"rank{rank}.safetensors"))
""")


def test_ddp_two_cpu_processes(small_text, tmp_path):
    """torchrun with 2 processes (gloo): weights identical on both ranks after training, loss
    goes down, ranks drew different batches, and only rank 0 wrote the checkpoint."""
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(REPO), str(small_text), str(out), str(dumps)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(str(dumps / "rank0.safetensors")), load_file(str(dumps / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    torch.manual_seed(5)  # the initial weights (same seed as the script): training moved them
    init = GPT(GPTConfig.from_preset("tiny", n_layer=1, n_embd=32, block_size=32, vocab_size=w0["transformer.wte.weight"].shape[0]))
    assert not torch.equal(init.state_dict()["transformer.h.0.mlp.c_fc.weight"], w0["transformer.h.0.mlp.c_fc.weight"])
    hist = ckpt.read_history(out)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    ranks = ckpt.load_train_state(out)["ranks"]
    assert len(ranks) == 2
    assert not torch.equal(ranks[0]["sampler"]["generator"], ranks[1]["sampler"]["generator"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ckpt.META_NAME, "model-12.safetensors", "train_state-12.pt", "history-12.json"])


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_model_val_loss(shakespeare_path):
    """The embedded shakespeare-char model: mean cross-entropy over the held-out last 10% of
    Tiny Shakespeare, in non-overlapping windows of the block size, must be <= 1.75."""
    assert (ckpt.DEFAULT_MODEL_DIR / ckpt.META_NAME).exists(), "no embedded model shipped"
    model, tok = ckpt.default_model()
    model.backend = "torch"
    text = shakespeare_path.read_text()
    ids = torch.tensor(tok.encode(text[int(len(text) * 0.9):]), dtype=torch.long)
    T = model.config.block_size
    n = (len(ids) - 1) // T
    x = ids[: n * T].view(n, T)
    y = ids[1: n * T + 1].view(n, T)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 128):
            logits, _ = model(x[i:i + 128])
            total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 128].flatten(), reduction="sum").item()
    val_loss = total / (n * T)
    print(f"shipped model val loss {val_loss:.4f} over {n * T} tokens")
    assert val_loss <= 1.75
