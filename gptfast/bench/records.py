"""Result rows: metadata, the printed table, and the files a run leaves behind.

Every row is a flat dict (one JSON object per line in `<out>/history.jsonl`) carrying the machine,
the versions, the git sha, the timestamp and the command, so a number can always be traced back
to where and how it was measured. `<out>/<suite>-<timestamp>.json` holds one run (meta, peaks,
rows, scaling rows) and is what `gptfast.bench.plots` reads; the `.csv` beside it has the rows.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Keys every history row has (tests check this schema). Measurement keys are None where a row
# has no number (an unavailable backend, a MISMATCH).
META_KEYS = ("timestamp", "command", "git_sha", "cpu", "cores", "threads", "gpu", "torch", "triton",
             "python", "device", "dtype")
ROW_KEYS = ("suite", "op", "mode", "shape", "case", "backend", "status", "reason", "median_ms",
            "p20_ms", "p80_ms", "n", "flops", "bytes", "gflops_per_s", "gbps", "pct_peak",
            "speedup_vs_torch", "speedup_vs_reference", "max_rel_err")
STATUSES = ("ok", "MISMATCH", "unavailable", "error", "LOSS DIFF")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_meta(device: str, dtype: str, command: str) -> dict[str, Any]:
    """The metadata stamped on every row of a run."""
    import torch

    from gptfast.io.checkpoint import git_sha

    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    return dict(
        timestamp=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=command,
        git_sha=git_sha() or "unknown",
        cpu=cpu_model(),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        gpu=gpu,
        torch=torch.__version__,
        triton=_version("triton"),  # read from metadata: importing triton here could start its JIT
        python=platform.python_version(),
        device=device,
        dtype=dtype,
    )


def new_row(suite: str, **kw: Any) -> dict[str, Any]:
    row = {k: None for k in ROW_KEYS}
    row.update(suite=suite, status="ok", reason="")
    row.update(kw)
    return row


# --------------------------------------------------------------------------- the printed table


def _fmt_rate(row: dict, device: str) -> str:
    if row.get("gflops_per_s") is not None:
        g = row["gflops_per_s"]
        return f"{g / 1e3:.1f} TFLOP/s" if device == "cuda" else f"{g:.1f} GFLOP/s"
    if row.get("gbps") is not None:
        return f"{row['gbps']:.1f} GB/s"
    if row.get("tokens_per_s") is not None:
        return f"{row['tokens_per_s']:.0f} tok/s"
    return "-"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(rows: list[dict], device: str, title: str, footer: list[str] = ()) -> str:
    """A plain-text table: op, shape, backend, median ms (p20/p80), throughput, % of peak,
    speedups; rows without a number say why (unavailable / MISMATCH / error)."""
    head = ["op", "mode", "shape", "backend", "median ms (p20/p80)", "throughput", "% peak",
            "vs torch", "vs ref", "note"]
    lines = []
    for r in rows:
        if r.get("median_ms") is not None:
            t = f"{r['median_ms']:.3f}"
            if r.get("p20_ms") is not None and r.get("p80_ms") is not None:
                t += f" ({r['p20_ms']:.3f}/{r['p80_ms']:.3f})"
        else:
            t = "-"
        pct = "-" if r.get("pct_peak") is None else f"{r['pct_peak']:.1f}%"
        note = "" if r["status"] == "ok" else r["status"]
        if r.get("reason"):
            note = f"{note}: {r['reason']}" if note else r["reason"]
        lines.append([str(r.get("op") or ""), str(r.get("mode") or ""), str(r.get("shape") or ""),
                      str(r.get("backend") or ""), t, _fmt_rate(r, device), pct,
                      _fmt_x(r.get("speedup_vs_torch")), _fmt_x(r.get("speedup_vs_reference")), note])
    widths = [max([len(head[i])] + [len(ln[i]) for ln in lines]) for i in range(len(head) - 1)]
    out = io.StringIO()
    out.write(f"\n== {title} ==\n")

    def emit(cols):
        out.write("  ".join(c.ljust(w) for c, w in zip(cols[:-1], widths)) + "  " + cols[-1] + "\n")

    emit(head)
    emit(["-" * w for w in widths] + ["-" * 4])
    for ln in lines:
        emit(ln)
    for f in footer:
        out.write(f + "\n")
    return out.getvalue()


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, text: str) -> None:
    from gptfast.io.atomic import write_file_atomic  # fsynced file and directory

    write_file_atomic(path, lambda tmp: tmp.write_text(text, newline=""))


def _jsonable(v):
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN / inf
    return v


def save_run(out_dir: str | os.PathLike, suite: str, meta: dict, rows: list[dict],
             peaks: dict | None = None, scaling: list[dict] | None = None) -> tuple[Path, Path]:
    """Append the rows (with meta) to `<out>/history.jsonl` and write `<suite>-<stamp>.json` and
    `.csv`. Returns (json path, csv path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.fromisoformat(meta["timestamp"]).strftime("%Y%m%d-%H%M%S")
    base = out / f"{suite}-{stamp}"
    n = 1
    while base.with_suffix(".json").exists():  # two runs in one second must not overwrite
        base = out / f"{suite}-{stamp}-{n}"
        n += 1
    full = [{**meta, **{k: _jsonable(v) for k, v in r.items()}} for r in rows + (scaling or [])]
    doc = dict(suite=suite, meta=meta, peaks=peaks, rows=full[: len(rows)], scaling=full[len(rows):])
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    _atomic_write(json_path, json.dumps(doc, indent=1))
    keys: list[str] = list(META_KEYS) + [k for k in ROW_KEYS]
    for r in full:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(full)
    _atomic_write(csv_path, buf.getvalue())
    with open(out / "history.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in full))
    return json_path, csv_path


def command_line(args) -> str:
    """The exact command that reproduces this run (from the parsed arguments)."""
    parts = ["gptfast", "bench", args.suite, "--device", args.device, "--dtype", args.dtype,
             "--backends", ",".join(args.backends), "--out", str(args.out), "--threads", str(args.threads)]
    if getattr(args, "repeats_given", True):  # else each suite's default (ops 20, generate 3; quick: 5, 1)
        parts += ["--repeats", str(args.repeats)]
    if args.quick:
        parts.append("--quick")
    if args.suite in ("train", "all"):
        parts += ["--steps", str(args.steps)]
    return " ".join(parts)


def print_err(*a) -> None:
    print(*a, file=sys.stderr)
