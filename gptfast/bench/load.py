"""How busy the machine was while a benchmark ran: CPU time taken by *other* processes.

A benchmark on a shared machine can rank kernels wrongly (issue #19: native ranked below Hugging
Face on a loaded VM, with no warning). The load average cannot tell our own threads from others'
and lags by a minute, so this meter reads the kernel's CPU accounting instead:

    others = (system-wide busy CPU time, incl. steal) - (this process's + its children's CPU time)

over the run's wall time, in cores (Linux /proc/stat; elsewhere the meter reports nothing). A VM's
steal time counts as busy: the hypervisor gave our cores to someone else. More than WARN_CORES of
other work means the figures of that run are unreliable, and the run says so.
"""

from __future__ import annotations

import os
import time

WARN_CORES = 0.25  # other processes' average use, in cores, above which a run is flagged


def _system_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user / nice]
    busy = ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class BusyMeter:
    """`m = BusyMeter(); ...run...; m.stop()` -> {"others_busy_cores", "loadavg_start", ...}."""

    def __init__(self) -> None:
        self.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.t0 = time.perf_counter()
        self.sys0 = _system_busy_seconds()
        self.own0 = _own_seconds()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        sys1 = _system_busy_seconds()
        out = {"loadavg_start": self.load_start, "others_busy_cores": None, "busy_warning": None}
        if self.sys0 is None or sys1 is None or wall <= 0:
            return out
        others = max(0.0, (sys1 - self.sys0) - (_own_seconds() - self.own0)) / wall
        out["others_busy_cores"] = round(others, 3)
        if others > WARN_CORES:
            out["busy_warning"] = (
                f"other processes used {others:.2f} of {os.cpu_count()} cores on average during this run "
                f"(load average {self.load_start:.2f} at the start): its timings and ratios are unreliable; "
                "rerun on a quiet machine"
            )
        return out


__all__ = ["BusyMeter", "WARN_CORES"]
