"""A thread count that fits the cores actually free (issue #19).

OpenMP workers that wait for a sibling spin for a while before sleeping; when another process
holds one of the cores, the sibling is descheduled and every parallel region of a decoding step
waits for it (a busy core cut GPT-2 batch 1 to under half its speed). Passive waiting fixes that
but slows a quiet machine (every parallel region then pays a futex wake-up); fitting the thread
count to the free cores keeps both (measurements: docs/PERF.md#threads-on-a-busy-machine), so
the CLI does that: it samples other processes' CPU use for SAMPLE_S (gptfast.bench.load.BusyMeter:
/proc/stat minus our own time) and lowers torch's thread count to the cores left free.
OMP_NUM_THREADS (or an explicit torch.set_num_threads by a library user, who never calls this) is
respected.
"""

from __future__ import annotations

import os
import time

SAMPLE_S = 0.1


def fit_threads_to_free_cores(sample_s: float = SAMPLE_S) -> tuple[int, int, float] | None:
    """Lower torch's intra-op threads to the cores not busy with other work. Returns (before,
    after, other processes' busy cores), or None when nothing was measured or changed (the user
    set OMP_NUM_THREADS, the platform has no /proc/stat, or the machine is free enough)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    from gptfast.bench.load import BusyMeter

    meter = BusyMeter()
    time.sleep(sample_s)
    others = meter.stop()["others_busy_cores"]
    if others is None:
        return None
    before = torch.get_num_threads()
    free = (os.cpu_count() or before) - others
    after = max(1, min(before, int(free + 0.5)))
    if after >= before:
        return None
    torch.set_num_threads(after)
    return before, after, others


__all__ = ["SAMPLE_S", "fit_threads_to_free_cores"]
