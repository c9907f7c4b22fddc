"""Plots of a saved benchmark run, drawn from its JSON only (measure once, plot separately).

    gptfast bench plot --from bench_results/ops-20261123-101500.json

- `<stem>-speedup.png`: speedup of every backend over `torch` per case (bars, log scale; 1 = torch).
- `<stem>-attention-scaling.png` (ops runs): causal attention fwd time vs T for each backend,
  log-log, with a T^2 line through the reference's first point for contrast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptfast.io.atomic import write_file_atomic

_COLORS = {"reference": "#7f7f7f", "torch": "#1f77b4", "native": "#2ca02c", "triton": "#d62728"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(json_path: str | os.PathLike) -> list[Path]:
    """Draw the plots of one run next to its JSON; returns the PNG paths written."""
    path = Path(json_path)
    doc = json.loads(path.read_text())
    written = []
    rows = doc.get("rows") or []
    if any(r.get("speedup_vs_torch") is not None for r in rows):
        written.append(plot_speedup(rows, path.with_name(path.stem + "-speedup.png"), doc.get("meta") or {}))
    if doc.get("scaling"):
        written.append(plot_scaling(doc["scaling"], path.with_name(path.stem + "-attention-scaling.png"),
                                    doc.get("meta") or {}))
    return written


def _where(meta: dict) -> str:
    return f"{meta.get('gpu') or meta.get('cpu', '?')}, {meta.get('threads', '?')} threads, {meta.get('dtype', '')}"


def plot_speedup(rows: list[dict], out: Path, meta: dict) -> Path:
    plt = _plt()
    cases = list(dict.fromkeys(r["case"] for r in rows if r.get("case")))
    # only backends with a number: an empty bar group would still take a (wrongly coloured) legend entry
    backends = [b for b in _COLORS if any(r["backend"] == b and r.get("speedup_vs_torch") for r in rows)]
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cases) + 2), 4.8))
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, c in enumerate(cases):
            r = next((r for r in rows if r.get("case") == c and r["backend"] == b), None)
            if r is not None and r.get("speedup_vs_torch"):
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                ys.append(r["speedup_vs_torch"])
        ax.bar(xs, ys, width=width, label=b, color=_COLORS[b])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs torch (median time ratio)")
    ax.set_title(f"gptfast bench {rows[0].get('suite', '')}: {_where(meta)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_file_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120))  # the user's file: replaced whole or not at all
    plt.close(fig)
    return out


def plot_scaling(rows: list[dict], out: Path, meta: dict) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for b, color in _COLORS.items():
        pts = sorted((r["T"], r["median_ms"]) for r in rows if r["backend"] == b and r.get("median_ms"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=b)
    ref = sorted((r["T"], r["median_ms"]) for r in rows if r["backend"] == "reference" and r.get("median_ms"))
    if ref:  # the O(T^2) guide through the reference's smallest T
        T0, t0 = ref[0]
        Ts = sorted({r["T"] for r in rows})
        ax.plot(Ts, [t0 * (T / T0) ** 2 for T in Ts], "--", color="black", lw=0.8, label="~T^2")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("median ms (causal attention fwd, B1 H12 D64)")
    ax.set_title(f"attention fwd vs T: {_where(meta)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    write_file_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120))  # the user's file: replaced whole or not at all
    plt.close(fig)
    return out
