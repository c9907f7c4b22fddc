"""`gptfast bench`: the ops, generate and train suites, and the command-line entry point.

    gptfast bench ops --device cpu --dtype fp32 --out bench_results
    gptfast bench all --quick
    gptfast bench plot --from bench_results/ops-20261123-101500.json

Each suite prints a table, writes `<out>/<suite>-<timestamp>.json` + `.csv`, appends its rows to
`<out>/history.jsonl`, then draws its plots from the saved JSON (`gptfast.bench.plots`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptfast.bench import records
from gptfast.bench.records import new_row

BACKENDS = ("reference", "torch", "native", "triton")
SUITES = ("ops", "generate", "train", "all", "plot", "quant-accuracy")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Train suite: a backend whose loss after the same steps, from the same seed and batches, differs
# from the reference's by more than this is flagged (a faster backend that trains worse is not
# faster). Backends differ only in rounding, which over a few hundred steps of this small model
# moves the loss by ~1e-3 in fp32; a broken backward moves it by > 0.1. Half precision (autocast)
# rounds each matmul to 8-11 bits, hence the wider band.
LOSS_TOL = {"fp32": 0.02, "fp16": 0.05, "bf16": 0.05}


# --------------------------------------------------------------------------- arguments


def _resolve_args(args) -> None:
    """Fill defaults and validate; raises UserError on bad input."""
    import torch

    from gptfast.errors import UserError

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    names = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise UserError(f"--backends: expected a comma-separated subset of {','.join(BACKENDS)}, "
                        f"got {args.backends!r}")
    args.backends = list(dict.fromkeys(names))
    if args.threads is None:
        args.threads = torch.get_num_threads()
    # A generation run is whole sequences (seconds each), not one op call: fewer repeats.
    args.generate_repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.repeats_given = args.repeats is not None  # the recorded command repeats only what was typed
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.steps is None:
        args.steps = 20 if args.quick else 100
    for name in ("threads", "repeats", "steps"):
        v = getattr(args, name)
        if v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")


# --------------------------------------------------------------------------- availability


def unavailable(backend: str, op: str, device_type: str, **call) -> str | None:
    """Why `backend` cannot be benchmarked for this op here, or None."""
    from gptfast import ops

    if backend == "triton" and device_type == "cpu":
        # Under TRITON_INTERPRET=1 the kernels do run on CPU (that is how they are tested), but the
        # interpreter executes each program instance in Python: its times say nothing about the kernel.
        return "Triton kernels need a GPU to be timed (the CPU interpreter is for testing only)"
    return ops.unavailable_reason(backend, op, device_type, **call)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:200]


# --------------------------------------------------------------------------- ops suite


def run_case(case, backends: list[str], device: str, dtype_name: str, repeats: int, peaks: dict,
             suite: str = "ops", seed: int = 0) -> list[dict]:
    """Check every backend against the reference, then time the ones that pass, interleaved.

    Returns one row per backend (unavailable / error / MISMATCH rows carry the reason and no time).
    """
    import torch

    from gptfast import ops
    from gptfast.bench import cases as C
    from gptfast.bench.timing import measure

    dtype = getattr(torch, DTYPES[dtype_name])
    inputs = C.build_inputs(case, dtype, device, seed=seed)
    call = C.dispatch_call(case, inputs)
    flops, nbytes = case.work(dtype)
    rows: dict[str, dict] = {}
    fns: dict[str, Any] = {}
    refs = C.reference_outputs(case, inputs)
    tol = C.tolerance(case, inputs, refs)
    for b in backends:
        row = rows[b] = new_row(suite, op=case.label, mode=case.mode, shape=case.shape_str, case=case.id,
                                backend=b, flops=flops, bytes=nbytes)
        reason = unavailable(b, case.op, device, **call)
        if reason is not None:
            row.update(status="unavailable", reason=reason)
            continue
        try:
            bad, err = C.check_backend(case, b, inputs, refs, tol)
        except ops.BackendUnavailableError as e:
            row.update(status="unavailable", reason=_first_line(e))
            continue
        except Exception as e:  # noqa: BLE001 - a crashing kernel is reported, not fatal to the run
            row.update(status="error", reason=_first_line(e))
            continue
        row["max_rel_err"] = err if err is not None and math.isfinite(err) else None
        if bad is not None:  # a wrong kernel is not benchmarked
            row.update(status="MISMATCH", reason=bad)
            continue
        fns[b] = C.make_call(case, b, inputs)
    timed: dict[str, Any] = {}
    try:
        timed = measure(fns, device, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large shape
        for b in fns:
            rows[b].update(status="error", reason=_first_line(e))
    for b, t in timed.items():
        r = rows[b]
        r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, n=t.n)
        sec = t.median_ms * 1e-3
        if flops is not None:
            r["gflops_per_s"] = flops / sec / 1e9
            r["pct_peak"] = 100 * r["gflops_per_s"] / peaks["matmul_gflops"] if peaks else None
        if nbytes is not None and flops is None:
            r["gbps"] = nbytes / sec / 1e9
            r["pct_peak"] = 100 * r["gbps"] / peaks["bw_gbps"] if peaks else None
        sheet = (peaks or {}).get("datasheet")
        if sheet:
            if r.get("gflops_per_s") is not None and dtype in (torch.bfloat16, torch.float16):
                r["pct_datasheet"] = 100 * r["gflops_per_s"] / (sheet["tflops_bf16"] * 1e3)
            elif r.get("gbps") is not None:
                r["pct_datasheet"] = 100 * r["gbps"] / (sheet["tbps"] * 1e3)
    add_speedups(list(rows.values()))
    return list(rows.values())


def add_speedups(rows: list[dict], key: str = "median_ms") -> None:
    """speedup_vs_torch / speedup_vs_reference = their median time / this row's (same case)."""
    by_backend = {r["backend"]: r for r in rows}
    for r in rows:
        if r.get(key) is None:
            continue
        for base, col in (("torch", "speedup_vs_torch"), ("reference", "speedup_vs_reference")):
            b = by_backend.get(base)
            if b is not None and b.get(key) is not None:
                r[col] = b[key] / r[key]


def ops_footer(device: str, peaks: dict) -> list[str]:
    unit = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    lines = [
        f"throughput: FLOP rows in {unit}, byte rows in GB/s (1e9 bytes/s); e = bytes per element",
        "  attention fwd FLOPs = 4*B*H*D*T(T+1)/2 (the causal pairs); bwd = 2.5x fwd, so fwd+bwd = 3.5x fwd",
        "  layer_norm bytes: fwd = (2*M*N + 2*N)*e (read x, write y, read w, b); fwd+bwd = (5*M*N + 5*N)*e",
        "  gelu_mlp FLOPs = 2*M*C*F*2 fwd; fwd+bwd = 3x fwd",
        "  decode_attn bytes = (2*H*D*sum(cache_lens) + 2*B*H*D)*e (K, V of the valid prefix; q; out)",
        "  sampling bytes = B*V*e (logits read once); top-k 50, top-p 0.9, temperature 1",
        "speedup = median time of torch (resp. reference) / median time of the row, same case, same run",
    ]
    if peaks:
        lines.append(
            f"machine peaks measured in this run: copy {peaks['copy_gbps']:.1f} GB/s (read+write), "
            f"read-only {peaks['read_gbps']:.1f} GB/s (fastest of several streaming reads, docs/PERF.md), "
            f"matmul {peaks['matmul_gflops']:.1f} GFLOP/s "
            f"({peaks['matmul_shape']}), fastest of a few runs each; % peak = FLOP rows / matmul peak, "
            "byte rows / max(copy, read)")
        sheet = peaks.get("datasheet")
        if sheet:
            lines.append(f"datasheet ({sheet['name']}): {sheet['tflops_bf16']} TFLOP/s bf16 dense, "
                         f"{sheet['tbps']} TB/s (rows: pct_datasheet in the JSON)")
    return lines


def suite_ops(args, meta: dict) -> tuple[list[dict], list[dict], dict]:
    from tqdm import tqdm

    from gptfast.bench import cases as C
    from gptfast.bench.timing import measure_peaks

    peaks = measure_peaks(args.device, quick=args.quick, repeats=3 if args.quick else 5)
    cases = C.QUICK_OPS_CASES if args.quick else C.OPS_CASES
    scaling = C.scaling_cases(args.device, args.quick)
    rows: list[dict] = []
    scale_rows: list[dict] = []
    bar = tqdm(cases + scaling, desc="bench ops", unit="case", file=sys.stderr, leave=False)
    for i, case in enumerate(bar):
        bar.set_postfix_str(case.id)
        got = run_case(case, args.backends, args.device, args.dtype, args.repeats, peaks, seed=args.seed)
        if i < len(cases):
            rows += got
        else:
            for r in got:
                r.update(suite="ops-scaling", T=case.shape["T"])
            scale_rows += got
    bar.close()
    return rows, scale_rows, peaks


# --------------------------------------------------------------------------- generate suite


def suite_generate(args, meta: dict) -> tuple[list[dict], list[dict], dict | None]:
    """Rows of `gptfast.bench.generate.benchmark_generate` (tokens/s vs Hugging Face, the peers and
    the bandwidth bound; the prompt pass). Its import is not guarded: a module that fails to import
    is a bug and raises with its traceback, never a silent "not available" row."""
    from gptfast.bench.generate import benchmark_generate

    try:
        got = benchmark_generate(device=args.device, dtype=args.dtype, backends=list(args.backends),
                                 quick=args.quick, threads=args.threads,
                                 repeats=getattr(args, "generate_repeats", args.repeats), seed=args.seed)
    except Exception as e:  # noqa: BLE001
        return [new_row("generate", op="generate", backend="-", status="error",
                        reason=_first_line(e))], [], None
    rows = [new_row("generate", **{"op": "generate", **g}) for g in got]
    add_speedups_by_case(rows)
    return rows, [], None


def add_speedups_by_case(rows: list[dict]) -> None:
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("op"), r.get("shape"), r.get("mode")), []).append(r)
    for g in groups.values():
        if any(r.get("speedup_vs_torch") is not None for r in g):
            continue  # the producer computed its own
        add_speedups(g)


# --------------------------------------------------------------------------- train suite


def _find_text(path: str | None) -> tuple[str, str]:
    """(text, where it came from) for the train suite."""
    from gptfast.errors import UserError

    if path:
        if not os.path.isfile(path):
            raise UserError(f"--data: file not found: {path}")
        return Path(path).read_text(encoding="utf-8"), path
    env = os.environ.get("GPTFAST_SHAKESPEARE")
    candidates = [Path(env)] if env else []
    # A source checkout keeps the data beside the repository (as the tests' fixture does).
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt")
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8"), "tinyshakespeare.txt"
    # Installed package without the data: a deterministic text with learnable structure (a
    # repeating verse with seeded substitutions) so losses still fall and can be compared.
    import random

    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(4000))
    return text, "synthetic text (Tiny Shakespeare not found)"


def suite_train(args, meta: dict) -> tuple[list[dict], list[dict], dict | None]:
    """Train nanoGPT's CPU shakespeare_char recipe (4 layers, 4 heads, 128 wide, block 64,
    batch 12, dropout 0) for `--steps` steps per backend: same seed, same batches, AdamW.

    Steps are interleaved across backends (step s of every backend, then step s + 1), for the
    same reason ops rows are: machine noise then hits every backend alike. The first steps (a
    tenth, at least 2) are warm-up and not timed; all steps count for the loss.
    """
    import contextlib

    import torch

    from gptfast import ops
    from gptfast.bench.timing import summarize
    from gptfast.config import GPTConfig
    from gptfast.model import GPT
    from gptfast.tokenizers import CharTokenizer
    from tqdm import tqdm

    text, source = _find_text(args.data)
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    B, T = 12, 64
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=T, vocab_size=tok.vocab_size, dropout=0.0)
    shape = f"4L 4H 128C T{T} B{B}"
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(data) - T - 1, (args.steps, B), generator=g)
    amp = (torch.autocast(args.device, dtype=getattr(torch, DTYPES[args.dtype]))
           if args.dtype != "fp32" else contextlib.nullcontext())
    rows, states = {}, {}
    for b in args.backends:
        rows[b] = new_row("train", op="train", mode="fwd+bwd+adamw", shape=shape, case=f"train {shape}",
                          backend=b, reason=f"data: {source}")
        reason = None
        for op, call in (("causal_attention", dict(dtype=torch.float32, head_dim=32, dropout_p=0.0)),
                         ("layer_norm", dict(dtype=torch.float32, n=128)), ("gelu_mlp", dict(dtype=torch.float32))):
            reason = reason or unavailable(b, op, args.device, **call)
        if reason is not None:
            rows[b].update(status="unavailable", reason=reason)
            continue
        torch.manual_seed(args.seed)  # identical initial weights for every backend
        model = GPT(cfg, backend=b).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        states[b] = dict(model=model, opt=opt, times=[], losses=[])
    warm = max(2, args.steps // 10)
    for s in tqdm(range(args.steps), desc="bench train", unit="step", file=sys.stderr, leave=False):
        idx = torch.stack([data[i:i + T] for i in starts[s].tolist()]).to(dev)
        tgt = torch.stack([data[i + 1:i + T + 1] for i in starts[s].tolist()]).to(dev)
        for b in list(states):
            st = states[b]
            try:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with amp:
                    _, loss = st["model"](idx, tgt)
                st["opt"].zero_grad(set_to_none=True)
                loss.backward()
                st["opt"].step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) * 1e3
            except ops.BackendUnavailableError as e:
                rows[b].update(status="unavailable", reason=_first_line(e))
                del states[b]
                continue
            except Exception as e:  # noqa: BLE001
                rows[b].update(status="error", reason=_first_line(e))
                del states[b]
                continue
            if s >= warm or args.steps <= warm:
                st["times"].append(dt)
            st["losses"].append(loss.item())
    k = min(10, args.steps)
    for b, st in states.items():
        t = summarize(st["times"])
        final = sum(st["losses"][-k:]) / k  # mean of the last k steps: one batch is noisy
        rows[b].update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, n=t.n,
                       tokens_per_s=B * T / (t.median_ms * 1e-3), loss=final, steps=args.steps)
    ref = rows.get("reference")
    tol = LOSS_TOL[args.dtype]
    for b, r in rows.items():
        if r.get("loss") is None:
            continue
        r["reason"] = f"loss {r['loss']:.4f} (mean of last {k} of {args.steps} steps); {r['reason']}"
        if ref is not None and ref.get("loss") is not None and b != "reference":
            r["loss_vs_reference"] = r["loss"] - ref["loss"]
            if abs(r["loss_vs_reference"]) > tol:
                r["status"] = "LOSS DIFF"
                r["reason"] = f"loss differs from the reference's by {r['loss_vs_reference']:+.4f} > {tol}; " + r["reason"]
    out = list(rows.values())
    add_speedups(out)
    return out, [], None


def train_footer(args) -> list[str]:
    return [f"train: nanoGPT's CPU recipe for shakespeare_char (dropout 0), AdamW lr 1e-3, same seed and "
            f"batches for every backend; throughput = B*T tokens / median ms per step",
            f"rows whose loss differs from the reference's by more than {LOSS_TOL[args.dtype]} are flagged LOSS DIFF"]


# --------------------------------------------------------------------------- entry point


def main(args) -> int:
    import torch

    from gptfast.errors import UserError

    if args.suite == "plot":
        from gptfast.bench.plots import plot_run

        if not args.from_json:
            raise UserError("bench plot: pass the run JSON with --from FILE")
        if not os.path.isfile(args.from_json):
            raise UserError(f"--from: file not found: {args.from_json}")
        for p in plot_run(args.from_json):
            print(f"wrote {p}")
        return 0
    if args.suite == "quant-accuracy":  # accuracy of the weight formats (#20): its own module and table
        from gptfast.bench import quant_accuracy

        return quant_accuracy.main(quant_accuracy.argv_from_bench(args))
    _resolve_args(args)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        suites = ["ops", "generate", "train"] if args.suite == "all" else [args.suite]
        for suite in suites:
            run_suite(suite, args)
    finally:
        torch.set_num_threads(old_threads)
    return 0


def run_suite(suite: str, args) -> Path:
    from gptfast.bench.load import BusyMeter

    meta = records.machine_meta(args.device, args.dtype, records.command_line(args))
    fn = {"ops": suite_ops, "generate": suite_generate, "train": suite_train}[suite]
    meter = BusyMeter()
    rows, scale_rows, peaks = fn(args, meta)
    busy = meter.stop()  # other processes' CPU use during the run, stamped on every row
    meta.update(others_busy_cores=busy["others_busy_cores"], loadavg_start=busy["loadavg_start"])
    where = f"{meta['gpu'] or meta['cpu']}, {meta['threads']} threads, {args.dtype}"
    if suite == "ops":
        footer = ops_footer(args.device, peaks)
    elif suite == "train":
        footer = train_footer(args)
    else:
        footer = ["generate: rows from gptfast.bench.generate.benchmark_generate"]
    if suite == "generate" and any(r.get("backend") == "bound" for r in rows):  # benchmark_generate's rows
        from gptfast.bench.generate import format_rows

        print(f"\n== bench generate ({where}) ==")
        print(format_rows(rows))
        print("tok/s = batch x new tokens / wall time of generate(); vs HF = tok/s / the fastest Hugging Face "
              "configuration's, same run (named below the table); % bound = bound step time (bytes per step / "
              "the best read-bandwidth reading of the run, below) / time; % local: the same with the readings just "
              "before and after the row")
    else:
        print(records.format_table(rows, args.device, f"bench {suite} ({where})", footer))
    if scale_rows:
        print(records.format_table(scale_rows, args.device, "causal attention fwd vs T (B1 H12 D64)", []))
    json_path, csv_path = records.save_run(args.out, suite, meta, rows, peaks, scale_rows)
    print(f"wrote {json_path}, {csv_path}, appended {Path(args.out) / 'history.jsonl'}")
    if busy["busy_warning"]:
        print(f"WARNING: {busy['busy_warning']}", file=sys.stderr)
    elif busy["others_busy_cores"] is not None:
        print(f"machine: other processes used {busy['others_busy_cores']:.2f} cores on average during the run")
    if not args.no_plot:
        from gptfast.bench.plots import plot_run

        try:
            for p in plot_run(json_path):
                print(f"wrote {p}")
        except ImportError as e:
            print(f"plots skipped: {e} (pip install matplotlib)")
    return json_path
