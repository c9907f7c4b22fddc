"""The benchmark's busy meter (gptfast/bench/load.py): other processes' CPU use during a run."""

from __future__ import annotations

import subprocess
import sys
import time

from gptfast.bench.load import WARN_CORES, BusyMeter


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def test_other_process_is_measured_and_flagged():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        m = BusyMeter()
        time.sleep(1.5)
        got = m.stop()
    finally:
        burner.kill()
        burner.wait()
    assert got["others_busy_cores"] is not None and got["others_busy_cores"] >= 0.6, got
    assert got["busy_warning"] and "unreliable" in got["busy_warning"]


def test_own_work_is_not_counted_as_others():
    # Background load (other sessions, CI neighbours) is measured while we sleep, then while we
    # spin one core ourselves: our own core must not show up as "others".
    m = BusyMeter()
    time.sleep(1.0)
    idle = m.stop()["others_busy_cores"]
    m = BusyMeter()
    _spin(1.0)
    got = m.stop()
    assert idle is not None and got["others_busy_cores"] is not None
    assert got["others_busy_cores"] < idle + 0.5, (idle, got)
    assert (got["others_busy_cores"] > WARN_CORES) == bool(got["busy_warning"])
