"""`gptfast attention-map`: heatmaps (or a graph) of each head's attention probabilities."""

from __future__ import annotations

from pathlib import Path

import torch

from gptfast.attention_map import attention_probs, plot_attention, plot_attention_graph, token_labels
from gptfast.cli._common import load_model_for_cli
from gptfast.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention-map", help="plot attention probabilities of a text",
        description="Heatmaps (or, with --graph, a directed graph) of the causal attention "
                    "probabilities of each head, with the tokens on both axes.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="gptfast checkpoint (default: the embedded Shakespeare model)")
    src.add_argument("--preset", help="a preset name, randomly initialised (for smoke tests)")
    p.add_argument("--text", default="To be, or not to be: that is the question.",
                   help="the text whose attention is drawn")
    p.add_argument("--layer", type=int, default=None, help="one layer (default: every layer)")
    p.add_argument("--head", type=int, default=None, help="one head (default: every head)")
    p.add_argument("--graph", action="store_true",
                   help="draw one head as a directed graph (default: last layer, head 0)")
    p.add_argument("--top", type=int, default=3, help="--graph: arrows per token (default: 3)")
    p.add_argument("--out", default="attention_map.png", help="PNG file to write")
    p.add_argument("--backend", default=None, choices=["auto", "reference", "torch", "native", "triton"],
                   help="op backend the blocks run on (the probabilities are the same on any)")


def run(args) -> int:
    model, tokenizer, what = load_model_for_cli(args)
    if args.backend:
        model.backend = args.backend
    ids = tokenizer.encode(args.text)
    if not ids:
        raise UserError("--text encodes to no tokens; give at least one character")
    if len(ids) > model.config.block_size:
        raise UserError(f"--text is {len(ids)} tokens; this model sees at most {model.config.block_size}")
    n_layer, n_head = model.config.n_layer, model.config.n_head
    if args.layer is not None and not -n_layer <= args.layer < n_layer:
        raise UserError(f"--layer must be in [0, {n_layer - 1}] (or negative from the end), got {args.layer}")
    if args.head is not None and not 0 <= args.head < n_head:
        raise UserError(f"--head must be in [0, {n_head - 1}], got {args.head}")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise UserError(f"--out: directory does not exist: {out.parent}")
    idx = torch.tensor([ids], dtype=torch.long)
    labels = token_labels(tokenizer, ids)
    if args.graph:
        layer = n_layer - 1 if args.layer is None else args.layer % n_layer
        head = 0 if args.head is None else args.head
        probs = attention_probs(model, idx, layer=layer)[0, 0, head]  # (T, T)
        plot_attention_graph(probs, labels, out, top=args.top,
                             title=f"{what}: layer {layer} head {head} (arrow i -> j: i attends to j)")
    else:
        layer = None if args.layer is None else args.layer % n_layer
        probs = attention_probs(model, idx, layer=layer)[:, 0]  # (L, H, T, T)
        layers = list(range(n_layer)) if layer is None else [layer]
        heads = None if args.head is None else [args.head]
        plot_attention(probs, labels, out, layers, heads, title=f"{what}: {args.text[:60]!r}")
    print(f"wrote {out}")
    return 0
