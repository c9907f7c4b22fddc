"""Benchmark the Triton kernels against PyTorch, the native CUDA ops (if built) and the reference.

Needs a CUDA GPU (not run in CI). Every provider goes through the dispatch layer
(`gptfast.ops.<op>(..., backend=name)`), so what is timed is what the model calls. Before an op is
timed its output is checked against the fp64 reference by the project's rule (gptfast/testing.py).

Timing: `gptfast.bench.timing.measure` (on CUDA `triton.testing.do_bench`, L2 flushed between
runs; median and 20th/80th percentiles, ms), the harness of `gptfast bench`. Throughput: the work
formulas of `gptfast.bench.cases` (attention_flops, layer_norm_bytes, mlp_flops, decode_bytes;
stated in its docstring and docs/PERF.md#flop-formulas) / median time; sampling: us per call (B
rows of a 50257-token vocabulary).

    python -m gptfast.bench.triton_gpu --out benchmarks/results/triton_gpu.json
    python -m gptfast.bench.triton_gpu --ops attention layer_norm --quick --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

OPS = ("attention", "layer_norm", "gelu_mlp", "decode_attention", "sample", "quantized_linear")
# quantized_linear formats timed (gptfast.quantize names -> (bits, group_size, zero point))
QUANT_FORMATS = {"int8": (8, None, False), "int8-g32": (8, 32, False), "int4-g32": (4, 32, False),
                 "int4-g128-zp": (4, 128, True)}
PROVIDERS = ("triton", "torch", "native", "reference")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="JSON file to write (results + machine/version metadata)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to benchmark (default: all)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="backends to time (unavailable ones are recorded as skipped)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--quick", action="store_true", help="the first shape of each op only")
    p.add_argument("--smoke", action="store_true",
                   help="CPU self-test of this script: tiny shapes, Triton interpreter, wall-clock timer "
                        "(numbers meaningless; checks that every code path runs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gptfast.bench.triton_gpu: needs a CUDA device (none found); nothing was measured", file=sys.stderr)
        return 2
    import triton

    from gptfast import ops
    from gptfast.bench import cases
    from gptfast.bench.timing import measure
    from gptfast.io.atomic import write_file_atomic
    from gptfast.io.checkpoint import git_sha

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        dtype = torch.float16  # the interpreter cannot run bf16 dots
    torch.manual_seed(0)
    rows: list[dict] = []

    def available(provider: str, op: str, **call) -> str | None:
        return ops.unavailable_reason(provider, op, dev, **call)

    def run(op_name, shape, mode, make_fn, work, unit, dispatch_op, call, providers=None, truth=None):
        """Time make_fn(provider)() for every provider; `work` = FLOPs or bytes per call. `truth`:
        a callable giving the fp64 reference output of a forward, which every provider's output is
        checked against by the project's rule (gptfast/testing.py: 2x PyTorch's own error)."""
        outs = {}
        for prov in providers or args.providers:
            row = {"op": op_name, "shape": shape, "mode": mode, "dtype": args.dtype, "provider": prov}
            reason = available(prov, dispatch_op, **call)
            if reason is not None:
                rows.append({**row, "skipped": reason})
                print(f"{op_name:18s} {mode:7s} {str(shape):28s} {prov:9s} skipped: {reason}")
                continue
            try:
                fn = make_fn(prov)
                out = fn()
                if mode == "fwd" and isinstance(out, torch.Tensor) and out.is_floating_point():
                    outs[prov] = out
                    row["out_checksum"] = float(out.float().abs().mean())
                t = measure({prov: fn}, dev, repeats=3 if args.smoke else 20)[prov]
                ms, p20, p80 = t.median_ms, t.p20_ms, t.p80_ms
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({**row, "skipped": "out of memory"})
                print(f"{op_name:18s} {mode:7s} {str(shape):28s} {prov:9s} out of memory")
                continue
            rate = work / (ms * 1e-3) / 1e12 if unit == "TFLOP/s" else work / (ms * 1e-3) / 1e9 if unit == "GB/s" else None
            row.update({"ms_median": ms, "ms_p20": p20, "ms_p80": p80, "unit": unit, "rate": rate})
            rows.append(row)
            rate_s = f"{rate:8.1f} {unit}" if rate is not None else f"{ms * 1e3:8.1f} us"
            print(f"{op_name:18s} {mode:7s} {str(shape):28s} {prov:9s} {ms:8.3f} ms  [{p20:.3f}, {p80:.3f}]  {rate_s}")
        # Correctness of what was timed: every provider vs the fp64 truth, by the project's rule
        # (the baseline is the reference run in the benchmark dtype, never a provider under test).
        if truth is not None and outs:
            from gptfast.testing import error_report

            want = truth()
            base = make_fn("reference")() if "reference" not in outs else outs["reference"]
            for prov, out in outs.items():
                bad = error_report(out, want, base, what=f"{op_name} {shape} {prov}")
                err = (out.double() - want).abs().max().item()
                for r in rows:
                    if r["op"] == op_name and r["shape"] == shape and r["mode"] == mode and r["provider"] == prov:
                        r["max_abs_err_vs_fp64"] = err
                        r["accuracy"] = "ok" if bad is None else "MISMATCH: " + bad
                if bad is not None:
                    print(f"{op_name:18s} {mode:7s} {str(shape):28s} {prov:9s} MISMATCH: {bad}")

    def first(shapes, smoke):
        return [smoke] if args.smoke else shapes[:1] if args.quick else shapes

    # ---- causal attention: B*T ~ 8192 tokens, 12 heads of 64 (GPT-2 small), T up to 8192.
    if "attention" in args.ops:
        for B, H, T, D in first([(8, 12, 1024, 64), (4, 12, 2048, 64), (2, 12, 4096, 64), (1, 12, 8192, 64), (8, 12, 1024, 128)],
                                 (1, 2, 33, 16)):
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype) for _ in range(3))
            flops = cases.attention_flops(B, H, T, D)
            call = dict(dtype=dtype, head_dim=D, dropout_p=0.0)
            run("causal_attention", (B, H, T, D), "fwd",
                lambda prov: (lambda: ops.causal_attention(q, k, v, backend=prov)), flops, "TFLOP/s", "causal_attention", call,
                truth=lambda: ops.causal_attention(q.double(), k.double(), v.double(), backend="reference"))
            if T <= 4096:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                do = torch.randn_like(q)

                def fwd_bwd(prov):
                    def f():
                        out = ops.causal_attention(qg, kg, vg, backend=prov)
                        torch.autograd.grad(out, (qg, kg, vg), do)
                    return f
                run("causal_attention", (B, H, T, D), "fwd+bwd", fwd_bwd, cases.attention_flops(B, H, T, D, "fwd+bwd"),
                    "TFLOP/s", "causal_attention", call)
            del q, k, v
            torch.cuda.empty_cache()

    # ---- layer norm: GPT-2 small activations, 32768 tokens x 768.
    if "layer_norm" in args.ops:
        for M, N in first([(32768, 768), (8192, 1600), (4096, 8192)], (9, 80)):
            x = torch.randn(M, N, device=dev, dtype=dtype)
            w, b = torch.randn(N, device=dev, dtype=dtype), torch.randn(N, device=dev, dtype=dtype)
            esz = x.element_size()
            call = dict(dtype=dtype, n=N)
            run("layer_norm", (M, N), "fwd", lambda prov: (lambda: ops.layer_norm(x, w, b, backend=prov)),
                cases.layer_norm_bytes(M, N, esz), "GB/s", "layer_norm", call,
                truth=lambda: ops.layer_norm(x.double(), w.double(), b.double(), backend="reference"))
            xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
            dy = torch.randn_like(x)

            def ln_fwd_bwd(prov):
                def f():
                    y = ops.layer_norm(xg, wg, bg, backend=prov)
                    torch.autograd.grad(y, (xg, wg, bg), dy)
                return f
            run("layer_norm", (M, N), "fwd+bwd", ln_fwd_bwd, cases.layer_norm_bytes(M, N, esz, "fwd+bwd"), "GB/s",
                "layer_norm", call)

    # ---- GELU MLP: 8192 tokens, 768 -> 3072 -> 768.
    if "gelu_mlp" in args.ops:
        for M, C, F_ in first([(8192, 768, 3072), (8192, 1024, 4096), (512, 768, 3072)], (17, 48, 80)):
            x = torch.randn(M, C, device=dev, dtype=dtype)
            w1 = torch.randn(F_, C, device=dev, dtype=dtype) * C ** -0.5
            b1 = torch.randn(F_, device=dev, dtype=dtype)
            w2 = torch.randn(C, F_, device=dev, dtype=dtype) * F_ ** -0.5
            b2 = torch.randn(C, device=dev, dtype=dtype)
            flops = cases.mlp_flops(M, C, F_)
            call = dict(dtype=dtype)
            run("gelu_mlp", (M, C, F_), "fwd", lambda prov: (lambda: ops.gelu_mlp(x, w1, b1, w2, b2, backend=prov)),
                flops, "TFLOP/s", "gelu_mlp", call,
                truth=lambda: ops.gelu_mlp(*(t.double() for t in (x, w1, b1, w2, b2)), backend="reference"))
            grads_in = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
            dy = torch.randn(M, C, device=dev, dtype=dtype)

            def mlp_fwd_bwd(prov):
                def f():
                    y = ops.gelu_mlp(*grads_in, backend=prov)
                    torch.autograd.grad(y, grads_in, dy)
                return f
            run("gelu_mlp", (M, C, F_), "fwd+bwd", mlp_fwd_bwd, cases.mlp_flops(M, C, F_, "fwd+bwd"), "TFLOP/s", "gelu_mlp",
                call)

    # ---- decode attention: B=8 sequences, a cache of 8192 positions, GPT-2 heads.
    if "decode_attention" in args.ops:
        for B, H, T_max, D, Tq in first([(8, 12, 8192, 64, 1), (8, 12, 8192, 64, 4), (1, 12, 8192, 64, 1), (8, 12, 1024, 64, 1), (8, 32, 8192, 128, 1)],
                                        (2, 2, 50, 16, 2)):
            q = torch.randn(B, H, Tq, D, device=dev, dtype=dtype)
            kc = torch.randn(B, H, T_max, D, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            lens = torch.full((B,), T_max, device=dev, dtype=torch.int32)
            lens[::2] = T_max * 3 // 4  # ragged batch
            nbytes = cases.decode_bytes(B, H, D, lens.tolist(), kc.element_size(), Tq)
            call = dict(dtype=dtype, head_dim=D)
            run("decode_attention", (B, H, T_max, D, Tq), "fwd",
                lambda prov: (lambda: ops.decode_attention(q, kc, vc, lens, backend=prov)), nbytes, "GB/s", "decode_attention", call,
                truth=lambda: ops.decode_attention(q.double(), kc.double(), vc.double(), lens, backend="reference"))

    # ---- sampling: GPT-2 vocabulary.
    if "sample" in args.ops:
        for B, (temp, top_k, top_p) in first([(8, (0.8, 50, 0.9)), (1, (0.8, 50, 0.9)), (8, (1.0, None, 0.95)), (64, (1.0, 200, None))],
                                       (2, (0.8, 5, 0.9))):
            V = 50 if args.smoke else 50257
            logits = torch.randn(B, V, device=dev, dtype=torch.float32) * 3
            gen = torch.Generator(device=dev).manual_seed(0)
            call = dict(dtype=logits.dtype)
            run("sample", (B, V, temp, top_k, top_p), "fwd",
                lambda prov: (lambda: ops.sample(logits, temp, top_k, top_p, gen, backend=prov)), 0, "us", "sample", call)

    # ---- quantized linear (#20): weight-only int8 / int4 decode GEMV and small-M GEMM. Memory bound:
    # GB/s over the packed weight + scales + x + y (cases.quantized_linear_bytes), and % of the read
    # bandwidth measured in the same run (timing.measure_read_bandwidth: a 1 GiB streaming read).
    # A dense fp16/bf16 F.linear row of the same shape ("dense", torch) shows what the bytes saved buy.
    read_peak = None
    if "quantized_linear" in args.ops:
        from gptfast.bench.timing import measure_read_bandwidth
        from gptfast.ops import quant

        read_peak = measure_read_bandwidth(dev, nbytes=(1 << 24) if args.smoke else None,
                                           repeats=2 if args.smoke else 7)
        print(f"read bandwidth (the bound): {read_peak['gbps']:.1f} GB/s ({read_peak['method']})")
        shapes = first([(1, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096), (1, 11008, 4096), (1, 4096, 11008),
                        (1, 2304, 768), (8, 3072, 768), (1, 768, 3072), (16, 50304, 768)], (1, 37, 256))
        if args.smoke:
            shapes += [(5, 37, 256)]  # the tl.dot path too
        for M, N, K in shapes:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            w = torch.randn(N, K, device=dev) * K ** -0.5
            for fmt, (bits, g, zp) in QUANT_FORMATS.items():
                qweight, scale, zero = quant.quantize_weight(w, bits, g, zp)
                nbytes = cases.quantized_linear_bytes(M, N, K, bits, g, zp, x.element_size())
                call = dict(dtype=dtype, bits=bits, group_size=g, zero=zp, act_int8=False)
                run(f"quantized_linear {fmt}", (M, N, K), "fwd",
                    lambda prov: (lambda: ops.quantized_linear(x, qweight, scale, zero, bits=bits, group_size=g,
                                                               backend=prov)),
                    nbytes, "GB/s", "quantized_linear", call,
                    truth=lambda: ops.quantized_linear(x.double(), qweight, scale, zero, bits=bits, group_size=g,
                                                       backend="reference"))
            wd = w.to(dtype)
            run("linear dense", (M, N, K), "fwd", lambda prov: (lambda: ops.linear(x, wd, backend=prov)),
                float((N * K + M * K + M * N) * x.element_size()), "GB/s", "linear",
                dict(dtype=dtype, weight_dtype=dtype), providers=["torch"])
            del w, wd
        for r in rows:
            if r["op"].startswith(("quantized_linear", "linear dense")) and r.get("rate") is not None:
                r["pct_of_read_bandwidth"] = 100.0 * r["rate"] / read_peak["gbps"]
                print(f"{r['op']:26s} {str(r['shape']):18s} {r['provider']:9s} {r['pct_of_read_bandwidth']:6.1f} % "
                      "of the read bandwidth")

    meta = {
        "read_bandwidth": read_peak,
        "gpu": "none (--smoke: CPU interpreter)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "git_sha": git_sha() or "unknown",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "results": rows}, indent=1, default=str)
    write_file_atomic(out, lambda tmp: tmp.write_text(text))  # a crash never leaves half a file
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
