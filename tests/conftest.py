"""Shared pytest fixtures for gptfast tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# Triton backend (tests/test_triton_*.py): without CUDA, run the Triton kernels in the interpreter.
# TRITON_INTERPRET must be set before triton is imported and before any @triton.jit kernel is
# defined, so it is set here, ahead of every test module (and of torch._inductor, which may import
# triton). An explicit setting by the caller is left alone.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# The `gptfast` command fits torch's threads to the cores other processes leave free and says so on
# stderr (gptfast.threads); tests that check the CLI's stderr line by line must not depend on what
# else the machine runs. An explicit thread count turns the fitting off (for in-process calls and
# for the CLI subprocesses, which inherit it); the threads tests set their own environment.
if not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Path of Tiny Shakespeare (1,115,394 characters, 65 distinct).

    ``$GPTFAST_SHAKESPEARE`` wins if set; otherwise ``<repo>/../shared/data/tinyshakespeare.txt``.
    Skips (rather than fails) only when the file truly is absent.
    """
    env = os.environ.get("GPTFAST_SHAKESPEARE")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    for p in candidates:
        if p.is_file():
            return p
    pytest.skip("Tiny Shakespeare not found (looked at: " + ", ".join(str(p) for p in candidates)
                + "); set GPTFAST_SHAKESPEARE to its path")


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests are skipped, with the reason shown, where no CUDA device exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here); runs when a GPU is lent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ----------------------------------------------------------------------------- CI: skips
# In CI a skip may mean "no CUDA device here" and nothing else: a missing package, file, compiler
# or a failed build must not pass as green. With CI=true (what .ci/run runs under) or
# GPTFAST_STRICT_SKIPS=1, any other skip -- of a test or of a whole module at collection -- is
# reported as a failure naming the reason.
_GPU_SKIP = re.compile(r"needs a CUDA device|no CUDA device|CUDA is available here|CUDA present")


def _strict_skips() -> bool:
    flag = os.environ.get("GPTFAST_STRICT_SKIPS") or os.environ.get("CI", "")
    return flag.strip().lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # (file, line, "Skipped: reason")
        return str(lr[2])
    return str(lr)


def _fail_non_gpu_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not _strict_skips():
        return
    reason = _skip_reason(report)
    if _GPU_SKIP.search(reason):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in CI for a reason other than 'no CUDA device': {reason}\n"
        "(CI=true: only GPU tests may skip; install what is missing through setup.py's test extra)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_non_gpu_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_non_gpu_skip(outcome.get_result())
