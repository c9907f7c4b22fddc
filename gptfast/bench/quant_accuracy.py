"""Accuracy of the weight formats (issue #20): what `gptfast.quantize` costs, measured.

    python -m gptfast.bench.quant_accuracy                  # both tables, markdown on stdout
    gptfast bench quant-accuracy [--quick] [--out DIR]       # the same, from the bench command
    python -m gptfast.bench.quant_accuracy --only shakespeare --out acc.json

1. The shipped Shakespeare model (`gptfast.io.default_model`): validation perplexity
   (`gptfast.perplexity`, sliding windows of the block size, stride half of it) on a fixed slice of
   Tiny Shakespeare's validation split (nanoGPT's last 10 %), and greedy agreement with fp32 over
   200 generated tokens from fixed prompts taken from that split: free-running (the fraction of
   positions where the format's own greedy token equals fp32's, and the first position where they
   differ: after one difference the texts part ways) and teacher-forced (`forced_agreement`: the
   format's argmax given fp32's tokens so far).
2. A random GPT-2 124M (`GPTConfig.from_preset("gpt2")`, torch.manual_seed(seed)): the mean KL
   divergence KL(p_fp32 || p_format) of the next-token distributions over a fixed text (the first
   tokens of the same validation split, GPT-2 BPE), in nats per token.

Every row also gives the weights' bytes (`gptfast.quantize.weight_bytes`: what a decode step
streams, the tied head once). Rows: fp32, bf16 and every format of `gptfast.quantize.QUANT_FORMATS`
with the LM head quantized (head=True) and kept fp32 (head=False); a format whose groups do not
divide a layer's width (int4-g128 on the shipped model's 192 channels) is reported as not
applicable. Ops run on the `torch` backend (the numbers are the formats', not a kernel's).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from gptfast.config import GPTConfig
from gptfast.data import train_val_split
from gptfast.errors import InputError
from gptfast.generation import generate
from gptfast.model import GPT
from gptfast.perplexity import sliding_window_perplexity
from gptfast.quantize import QUANT_FORMATS, quantize, weight_bytes

ROWS = ("fp32", "bf16", *QUANT_FORMATS)
N_VAL = 16384  # validation tokens (characters) scored on the shipped model
N_GEN = 200  # greedy tokens compared with fp32
PROMPT_CHARS = 64
PROMPT_OFFSETS = (0, 4096, 8192)  # prompts: PROMPT_CHARS characters of the validation split at these offsets
N_KL = 1024  # GPT-2 tokens (one block) for the KL divergence
BACKEND = "torch"


def shakespeare_text() -> str:
    """Tiny Shakespeare: $GPTFAST_SHAKESPEARE, else the copy in shared/data beside the source tree."""
    env = os.environ.get("GPTFAST_SHAKESPEARE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt")
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8")
    raise InputError("Tiny Shakespeare not found (looked at: " + ", ".join(map(str, candidates))
                     + "); set GPTFAST_SHAKESPEARE to its path")


def val_text(text: str) -> str:
    """The validation split of the text (its last 10 %, nanoGPT's split, by characters)."""
    return text[int(len(text) * 0.9):]


def variant(model: GPT, fmt: str, head: bool = True) -> GPT | None:
    """A copy of `model` in `fmt` ("fp32": the model itself), or None where the format does not
    apply (a layer width its groups do not divide)."""
    if fmt == "fp32":
        return model
    try:
        return quantize(copy.deepcopy(model), fmt, head=head)
    except InputError:
        return None


def perplexity(model: GPT, ids: torch.Tensor) -> float:
    block = model.config.block_size
    ppl, _ = sliding_window_perplexity(model, ids, max_length=block, stride=block // 2, batch_size=32)
    return ppl


def greedy(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    return generate(model, prompts, n, temperature=0.0)


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions where got == want, mean first differing position (n if none))."""
    same = total = 0
    first = []
    for g, w in zip(got, want):
        eq = [a == b for a, b in zip(g, w)]
        same += sum(eq)
        total += len(w)
        first.append(eq.index(False) if False in eq else len(w))
    return same / max(total, 1), sum(first) / max(len(first), 1)


@torch.no_grad()
def forced_agreement(model: GPT, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Teacher-forced greedy agreement: the fraction of positions of fp32's greedy continuations
    where `model`'s argmax, given exactly fp32's preceding tokens (the last block_size of them, as
    generation slides), is fp32's token. Unlike free-running agreement, one early difference does
    not make every later position differ."""
    block = model.config.block_size
    same = total = 0
    for p, g in zip(prompts, continuations):
        seq = torch.tensor(p + g, dtype=torch.long)
        by_len: dict[int, list[int]] = {}
        for i in range(len(p), len(seq)):
            by_len.setdefault(min(i, block), []).append(i)
        for L, positions in by_len.items():
            idx = torch.stack([seq[i - L:i] for i in positions])  # (n, L) contexts
            pred = model(idx)[0][:, -1].argmax(-1)
            same += int((pred == seq[positions]).sum())
            total += len(positions)
    return same / max(total, 1)


@torch.no_grad()
def shakespeare_rows(model: GPT, tokenizer, text: str, *, rows=ROWS, heads=(True, False), n_val: int = N_VAL,
                     n_gen: int = N_GEN, offsets=PROMPT_OFFSETS, log=None) -> list[dict]:
    """Perplexity and greedy agreement of each format on the shipped model (see the module doc)."""
    model = model.eval()
    model.backend = BACKEND
    val = val_text(text)
    ids = torch.tensor(tokenizer.encode(val[:n_val]), dtype=torch.long)
    prompts = [tokenizer.encode(val[o:o + PROMPT_CHARS]) for o in offsets]
    base_ppl = perplexity(model, ids)
    base_gen = greedy(model, prompts, n_gen)
    out = []
    for fmt in rows:
        for head in (heads if fmt != "fp32" else (True,)):
            t0 = time.perf_counter()
            m = variant(model, fmt, head)
            row = {"model": "shakespeare-char (shipped)", "format": fmt, "head": head if fmt != "fp32" else None}
            if m is None:
                row["note"] = "not applicable: a layer width is not a multiple of the group size"
            else:
                ppl = perplexity(m, ids)
                frac, first = agreement(greedy(m, prompts, n_gen), base_gen)
                row.update(bytes=weight_bytes(m), ppl=ppl, ppl_change_pct=100 * (ppl / base_ppl - 1),
                           greedy_agreement=frac, first_difference=first,
                           forced_agreement=forced_agreement(m, prompts, base_gen), val_tokens=int(ids.numel()),
                           gen_tokens=n_gen, prompts=len(prompts))
            out.append(row)
            if log:
                log(f"shakespeare {fmt} head={head}: {_fmt_row(row)} ({time.perf_counter() - t0:.1f} s)")
    return out


@torch.no_grad()
def kl_rows(text: str, *, rows=ROWS, heads=(True, False), n_tokens: int = N_KL, seed: int = 0,
            n_layer: int | None = None, log=None) -> list[dict]:
    """Mean KL(p_fp32 || p_format) per next token of a random GPT-2 124M (see the module doc).
    `n_layer` shrinks the model (tests); None = the 124M preset."""
    from gptfast.tokenizers import GPT2Tokenizer

    torch.manual_seed(seed)
    overrides = {} if n_layer is None else {"n_layer": n_layer}
    model = GPT(GPTConfig.from_preset("gpt2", dropout=0.0, **overrides), backend=BACKEND).eval()
    ids = torch.tensor([GPT2Tokenizer().encode(val_text(text)[: 8 * n_tokens])[:n_tokens]], dtype=torch.long)
    ref = torch.log_softmax(model(ids)[0].double(), dim=-1)
    p = ref.exp()
    out = []
    for fmt in rows:
        for head in (heads if fmt != "fp32" else (True,)):
            t0 = time.perf_counter()
            m = variant(model, fmt, head)
            row = {"model": f"gpt2 random (seed {seed}{'' if n_layer is None else f', {n_layer} layers'})",
                   "format": fmt, "head": head if fmt != "fp32" else None}
            if m is None:
                row["note"] = "not applicable"
            else:
                lq = torch.log_softmax(m(ids)[0].double(), dim=-1)
                kl = (p * (ref - lq)).sum(-1)  # (1, T)
                top1 = (lq.argmax(-1) == ref.argmax(-1)).double().mean().item()
                row.update(bytes=weight_bytes(m), kl_mean=kl.mean().item(), kl_max=kl.max().item(),
                           top1_agreement=top1, tokens=int(ids.numel()))
            out.append(row)
            del m
            if log:
                log(f"gpt2 {fmt} head={head}: {_fmt_row(row)} ({time.perf_counter() - t0:.1f} s)")
    return out


def _fmt_row(r: dict) -> str:
    if "note" in r:
        return r["note"]
    parts = [f"{r['bytes'] / 1e6:.2f} MB"]
    if "ppl" in r:
        parts += [f"ppl {r['ppl']:.4f} ({r['ppl_change_pct']:+.2f} %)", f"greedy {100 * r['greedy_agreement']:.1f} %",
                  f"first diff {r['first_difference']:.0f}", f"forced {100 * r['forced_agreement']:.1f} %"]
    if "kl_mean" in r:
        parts += [f"KL {r['kl_mean']:.3g}", f"top-1 {100 * r['top1_agreement']:.1f} %"]
    return ", ".join(parts)


def markdown(shakespeare: list[dict], kl: list[dict]) -> str:
    """The README tables."""
    lines = []
    if shakespeare:
        base = next(r for r in shakespeare if r["format"] == "fp32")
        lines += [f"Shipped Shakespeare model: validation perplexity on {base['val_tokens']:,} characters, greedy "
                  f"agreement with fp32 over {base['gen_tokens']} tokens x {base['prompts']} prompts",
                  "", "| format | LM head | weights | perplexity | vs fp32 | greedy = fp32 (free-running) | "
                      "first difference | greedy = fp32 (teacher-forced) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in shakespeare:
            head = "-" if r["head"] is None else ("quantized" if r["head"] else "fp32")
            if "note" in r:
                lines.append(f"| {r['format']} | {head} | - | - | - | - | - | {r['note']} |")
                continue
            lines.append(f"| {r['format']} | {head} | {r['bytes'] / 1e6:.2f} MB | {r['ppl']:.4f} | "
                         f"{r['ppl_change_pct']:+.2f} % | {100 * r['greedy_agreement']:.1f} % | "
                         f"{r['first_difference']:.0f} | {100 * r['forced_agreement']:.1f} % |")
    if kl:
        base = next(r for r in kl if r["format"] == "fp32")
        lines += ["", f"{base['model']}: KL(fp32 || format) of the next-token distributions over "
                      f"{base['tokens']} tokens of Tiny Shakespeare (validation split, GPT-2 BPE)",
                  "", "| format | LM head | weights | mean KL (nats) | max KL | top-1 = fp32 |", "|---|---|---|---|---|---|"]
        for r in kl:
            head = "-" if r["head"] is None else ("quantized" if r["head"] else "fp32")
            if "note" in r:
                lines.append(f"| {r['format']} | {head} | - | - | - | {r['note']} |")
                continue
            lines.append(f"| {r['format']} | {head} | {r['bytes'] / 1e6:.1f} MB | {r['kl_mean']:.2e} | "
                         f"{r['kl_max']:.2e} | {100 * r['top1_agreement']:.1f} % |")
    return "\n".join(lines)


def argv_from_bench(args) -> list[str]:
    """`gptfast bench quant-accuracy` flags -> this module's: --out DIR gets
    quant_accuracy-<time>.json, --threads passes through, --quick makes a smoke run (int8 and
    int4-g32, head quantized, 2,048 characters, 256 GPT-2 tokens)."""
    argv = ["--seed", str(getattr(args, "seed", 0) or 0)]
    if getattr(args, "threads", None):
        argv += ["--threads", str(args.threads)]
    if getattr(args, "quick", False):
        argv += ["--formats", "fp32,int8,int4-g32", "--head", "quantized", "--n-val", "2048", "--n-kl", "256"]
    out = getattr(args, "out", None)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        argv += ["--out", str(Path(out) / f"quant_accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json")]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptfast.bench.quant_accuracy", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", choices=["shakespeare", "kl"], default=None, help="run one table (default: both)")
    p.add_argument("--formats", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--head", choices=["both", "quantized", "fp32"], default="both", help="LM head variants")
    p.add_argument("--n-val", type=int, default=N_VAL, help="validation characters scored")
    p.add_argument("--n-kl", type=int, default=N_KL, help="GPT-2 tokens for the KL divergence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random GPT-2")
    p.add_argument("--out", default=None, help="write the rows as JSON here (atomically)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    rows = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = [f for f in rows if f not in ROWS]
    if bad:
        p.error(f"--formats: unknown {bad}; expected some of {list(ROWS)}")
    if "fp32" not in rows:
        rows = ("fp32", *rows)
    heads = {"both": (True, False), "quantized": (True,), "fp32": (False,)}[args.head]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)  # small ops on a shared machine: 1 thread is the fastest (tests/test_engine.py)
    text = shakespeare_text()
    shakes, kl = [], []
    if args.only in (None, "shakespeare"):
        from gptfast.io import default_model

        model, tok = default_model()
        shakes = shakespeare_rows(model, tok, text, rows=rows, heads=heads, n_val=args.n_val, log=log)
    if args.only in (None, "kl"):
        kl = kl_rows(text, rows=rows, heads=heads, n_tokens=args.n_kl, seed=args.seed, log=log)
    print(markdown(shakes, kl))
    if args.out:
        from gptfast.io.atomic import write_file_atomic

        data = json.dumps({"shakespeare": shakes, "kl": kl, "torch": torch.__version__,
                           "threads": torch.get_num_threads()}, indent=1,
                          default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v))
        write_file_atomic(args.out, lambda tmp: Path(tmp).write_text(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
