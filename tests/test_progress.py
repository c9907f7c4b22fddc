"""Long work says how it is going (issue #19): perplexity progress on a non-terminal stderr, a
batched perplexity default, and the OpenMP wait policy that keeps two threads from collapsing
on a busy machine."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.perplexity import sliding_window_perplexity


def test_perplexity_progress_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    """Before, the bar was tqdm(disable=None): off when stderr is not a TTY, so a 14-minute run in
    a log printed nothing until the end. Now a plain progress line appears (every 10 s; here,
    with the interval set to 0, every batch) ending at 100%. capsys' stderr is not a TTY."""
    import gptfast.perplexity as ppl_mod

    monkeypatch.setattr(ppl_mod, "PROGRESS_INTERVAL_S", 0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 65, (400,))
    sliding_window_perplexity(model, ids, max_length=32, stride=16, batch_size=4, progress=True)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("perplexity: ")]
    assert len(lines) > 1 and "windows (100%)" in lines[-1], err


def test_perplexity_cli_default_is_batched():
    """The README example (stride 64 over Tiny Shakespeare) ran 13m41s with one window per
    forward pass; the default batches 32 windows."""
    import argparse

    from gptfast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["perplexity"].get_default("batch_size") >= 32


def test_threads_fit_the_free_cores(monkeypatch):
    """With another process burning a core, `fit_threads_to_free_cores` leaves that core alone
    (2 threads waiting on a descheduled sibling ran 2x slower than 1: gptfast/threads.py); with
    OMP_NUM_THREADS set it changes nothing."""
    import torch

    from gptfast.threads import fit_threads_to_free_cores

    n = os.cpu_count() or 1
    old = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # tests/conftest.py sets it for the CLI tests
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(1, n - 1))]
    try:
        import time

        time.sleep(0.5)
        torch.set_num_threads(n)
        got = fit_threads_to_free_cores(sample_s=0.5)
        assert got is not None and got[1] < n and torch.get_num_threads() == got[1], got
        torch.set_num_threads(n)
        monkeypatch.setenv("OMP_NUM_THREADS", str(n))
        assert fit_threads_to_free_cores(sample_s=0.2) is None and torch.get_num_threads() == n
    finally:
        for b in burners:
            b.kill()
            b.wait()
        torch.set_num_threads(old)
