"""Backend selection: precedence, errors, explain(), native available on CPU, fallback on a failed
build, and `import gptfast` building nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptfast import ops
from gptfast.ops import native


def test_native_is_available_on_cpu():
    # A broken build must fail CI here, not silently skip every native test.
    assert native.availability("cpu") is None, native.availability("cpu")
    for op in ("layer_norm", "gelu_mlp", "sample"):
        assert ops.unavailable_reason("native", op, "cpu", dtype=torch.float32) is None


def test_precedence(monkeypatch):
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    assert ops.requested_backend() == "reference"
    ops.set_backend("torch")
    try:
        assert ops.requested_backend() == "torch"
        with ops.use_backend("native"):
            assert ops.requested_backend() == "native"
            assert ops.requested_backend("reference") == "reference"
            assert ops.resolve("layer_norm", "cpu", dtype=torch.float32) == "native"
        assert ops.requested_backend() == "torch"
    finally:
        ops.set_backend(None)
    assert ops.requested_backend() == "reference"
    monkeypatch.delenv("GPTFAST_BACKEND")
    assert ops.requested_backend() == "auto"
    assert ops.resolve("layer_norm", "cpu", dtype=torch.float32) in ("triton", "native")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.set_backend("nope")
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        ops.layer_norm(torch.randn(2, 3), None, None, backend="fast")


def test_explain():
    chosen, status = ops.explain("layer_norm", "cpu")
    assert chosen in status and status[chosen].startswith("selected")
    assert status["native"] in ("available",) or status["native"].startswith("selected")
    assert set(status) == set(ops.BACKENDS)


def test_native_unsupported_dtype_falls_back():
    assert "float32 and float64" in native.unsupported("layer_norm", device_type="cpu", dtype=torch.float16)
    assert ops.resolve("layer_norm", "cpu", dtype=torch.float16) != "native"


def test_failed_build_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'x':\nFAILED: a.o\ncsrc/cpu/a.cpp:1:1: error: boom\n")

    monkeypatch.setattr(native._loader, "_STATE", native._loader._LoaderState())
    monkeypatch.setattr(native._loader, "_prebuilt", lambda: None)
    monkeypatch.setattr(native._loader, "_jit_build", broken)
    monkeypatch.delenv("GPTFAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="native extension is unavailable"):
        reason = native.availability("cpu")
    assert reason == "build failed: csrc/cpu/a.cpp:1:1: error: boom"
    chosen, status = ops.explain("layer_norm", "cpu")
    assert status["native"] == reason
    assert ops.resolve("gelu_mlp", "cpu", dtype=torch.float32) == "torch" or chosen == "triton"
    with pytest.raises(ops.BackendUnavailableError, match="build failed: csrc/cpu/a.cpp"):
        ops.layer_norm(torch.randn(2, 3), None, None, backend="native")
    with pytest.raises(RuntimeError, match="build failed"):  # remembered: no second attempt
        native.load_extension()


def test_import_builds_nothing(tmp_path):
    code = (
        "import sys, gptfast, gptfast.ops\n"
        "import torch.utils.cpp_extension as ce\n"
        "ce.load = lambda *a, **k: sys.exit('built!')\n"
        "assert 'gptfast.ops.native._loader' not in sys.modules or not sys.modules['gptfast.ops.native._loader']._STATE.loaded\n"
        "assert not any(n.startswith('gptfast_C') or n == 'gptfast._C' for n in sys.modules)\n"
        "print('ok')\n"
    )
    env = {"GPTFAST_EXT_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "importing gptfast created files in the extension cache"


def test_old_jit_builds_are_pruned(tmp_path):
    """Each source change is a new ext-<hash> build in the cache: keep the most recently used few
    (and anything touched in the last hour), never the one in use, nothing not named like ours."""
    import os
    import time

    from gptfast.ops import native

    now = time.time()
    dirs = []
    for i in range(7):  # ext-...0 newest, ext-...6 oldest (days old)
        d = tmp_path / f"ext-{i:016x}"
        d.mkdir()
        (d / "lib.so").write_text("x")
        os.utime(d, (now - 86400 * i - 7200, now - 86400 * i - 7200))
        dirs.append(d)
    os.utime(dirs[5], (now - 60, now - 60))  # touched a minute ago: another process may be building it
    os.utime(dirs[4], (now - 120, now - 120))
    other = tmp_path / "ext-not-ours"
    other.mkdir()
    os.utime(other, (now - 86400 * 30, now - 86400 * 30))
    current = dirs[6]  # in use, yet the oldest by mtime: must survive
    removed = native.prune_builds(str(current), keep=3)  # keeps 5, 4 (recent) and 0; 6 is in use
    assert sorted(removed) == sorted(str(d) for d in dirs[1:4]), removed
    removed = native.prune_builds(str(current), keep=1)  # 4 survives: used < 1 hour ago
    assert removed == [str(dirs[0])], removed
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {d.name for d in (dirs[4], dirs[5], dirs[6])} | {"ext-not-ours"}
