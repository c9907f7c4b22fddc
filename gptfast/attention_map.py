"""Attention maps: what each head of a GPT looks at, as heatmaps or as a graph.

    from gptfast.attention_map import attention_probs, plot_attention
    probs = attention_probs(model, idx)             # (n_layer, B, H, T, T)
    probs = attention_probs(model, idx, layer=-1)   # (1, B, H, T, T), last layer only

    gptfast attention-map --text "To be, or not to be" --out map.png            # every layer x head
    gptfast attention-map --text "To be, or not to be" --layer 3 --head 1 --graph --out g.png

The probabilities are recomputed from the model's own queries and keys: the blocks are run one
by one and, before each block, `q, k = block.attn.split_heads(block.ln_1(x))` is fed to
`gptfast.ops.reference.attention_probs` (softmax(q k^T / sqrt(hs)) with the causal mask). This is
the matrix the model's fused attention kernels apply without ever storing it, so the map is exact
(up to fp32 rounding) whatever backend the model runs on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from gptfast.ops import reference
from gptfast.errors import InputError


@torch.no_grad()
def attention_probs(model, idx: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Causal attention probabilities of `model` on token ids `idx`.

    Args:
        model: a `gptfast.model.GPT` (run in eval mode here: dropout off; its mode is restored).
        idx: (B, T) int64 token ids, T <= block_size (a (T,) tensor is taken as B = 1).
        layer: None for every layer, or one layer index (negative counts from the end).
    Returns:
        fp32 tensor (n_layer, B, H, T, T), or (1, B, H, T, T) for one layer: entry [l, b, h, i, j]
        is how much query token i attends to key token j in head h of layer l. Rows sum to 1 and
        the upper triangle (j > i) is 0.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2:
        raise InputError(f"attention_probs: idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    blocks = model.transformer.h
    n_layer = len(blocks)
    if layer is not None:
        if not isinstance(layer, int) or not -n_layer <= layer < n_layer:
            raise InputError(f"attention_probs: layer must be an int in [{-n_layer}, {n_layer - 1}], got {layer!r}")
        layer %= n_layer
    B, T = idx.shape
    if T > model.config.block_size:
        raise InputError(f"attention_probs: sequence length {T} exceeds the block size {model.config.block_size}")
    if T == 0:
        raise InputError("attention_probs: idx holds no tokens")
    was_training = model.training
    model.eval()
    try:
        tr = model.transformer
        pos = torch.arange(T, device=idx.device)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        out = []
        for i, block in enumerate(blocks):
            if layer is None or i == layer:
                q, k, _ = block.attn.split_heads(block.ln_1(x))  # (B, nh, T, hs) each
                out.append(reference.attention_probs(q, k))  # (B, nh, T, T)
                if layer is not None:
                    break
            x = block(x)
    finally:
        model.train(was_training)
    return torch.stack(out)  # (L, B, nh, T, T)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One printable label per token: the character (char model) or the decoded BPE piece.

    Whitespace is made visible (space -> '␣', newline -> '⏎', tab -> '⇥') so that a map of
    "to be" does not show blank ticks.
    """
    labels = []
    for i in ids:
        piece = tokenizer.decode([int(i)])
        piece = piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
        labels.append(piece if piece else f"<{i}>")
    return labels


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # writes files; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _ticks(ax, labels: list[str], fontsize: float) -> None:
    T = len(labels)
    every = max(1, math.ceil(T / 64))  # at most ~64 labels per axis stay readable
    pos = list(range(0, T, every))
    ax.set_xticks(pos)
    ax.set_xticklabels([labels[p] for p in pos], rotation=90, fontsize=fontsize)
    ax.set_yticks(pos)
    ax.set_yticklabels([labels[p] for p in pos], fontsize=fontsize)


def plot_attention(probs: torch.Tensor, labels: list[str], out: str | os.PathLike,
                   layers: list[int], heads: list[int] | None = None, title: str = "") -> Path:
    """Heatmaps of attention probabilities, one panel per (layer, head), written as a PNG.

    probs: (L, H, T, T) for one sequence, L matching `layers` (the layer numbers shown).
    heads: which heads to draw (default: all). Rows are query tokens, columns key tokens.
    """
    plt = _plt()
    L, H, T, _ = probs.shape
    heads = list(range(H)) if heads is None else heads
    panels = [(li, h) for li in range(L) for h in heads]
    if L == 1:  # one layer: heads in a near-square grid
        cols = math.ceil(math.sqrt(len(panels)))
        rows = math.ceil(len(panels) / cols)
    else:  # a row per layer, a column per head
        rows, cols = L, len(heads)
    size = min(6.0, max(2.5, 0.16 * T + 1.2))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    # Tick labels as tall as a cell (72 points per inch), clamped to stay legible.
    fs = max(3.5, min(9.0, 0.8 * 72 * size * 0.75 / max(T, 1)))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (li, h) in zip(axes.flat, panels):
        im = ax.imshow(probs[li, h].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layers[li]} head {h}", fontsize=9)
        _ticks(ax, labels, fs)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention probability")
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_attention_graph(probs: torch.Tensor, labels: list[str], out: str | os.PathLike, top: int = 3,
                         title: str = "") -> Path:
    """One head's attention as a directed graph: tokens are nodes on a line, left to right; an
    arrow from token i to token j (j <= i) for each of the `top` largest weights of row i, its
    width and opacity proportional to the probability. Matplotlib only.

    probs: (T, T) one head, one sequence.
    """
    from matplotlib.patches import FancyArrowPatch

    plt = _plt()
    T = probs.shape[0]
    # Equal aspect: an arc of rad 0.45 between tokens d apart rises 0.225 d above the line.
    height = 0.23 * max(T - 1, 1) + 0.4
    width = max(6.0, 0.45 * T + 1)
    fig, ax = plt.subplots(figsize=(width, max(2.5, width * (height + 1.0) / (T + 1) + 0.8)))
    xs = list(range(T))
    ax.scatter(xs, [0] * T, s=60, color="#1f77b4", zorder=3)
    for i, lab in enumerate(labels):
        ax.text(i, -0.15, lab, ha="center", va="top", fontsize=9, rotation=90 if len(lab) > 2 else 0)
    k = min(top, T)
    for i in range(T):
        w, j = torch.topk(probs[i, : i + 1], min(k, i + 1))
        for p, jj in zip(w.tolist(), j.tolist()):
            if p < 0.02:  # a hair-thin arrow only adds clutter
                continue
            if jj == i:  # attending to itself: a small loop above the node
                ax.add_patch(plt.Circle((i, 0.12), 0.1, fill=False, lw=0.5 + 3 * p, alpha=0.2 + 0.8 * p,
                                        color="#d62728"))
                continue
            # Arcs above the line, higher for longer jumps, so arrows from different rows separate.
            arrow = FancyArrowPatch((i, 0.02), (jj, 0.02), connectionstyle="arc3,rad=0.45",
                                    arrowstyle="-|>", mutation_scale=8 + 6 * p, lw=0.5 + 3 * p,
                                    alpha=0.2 + 0.8 * p, color="#d62728")
            ax.add_patch(arrow)
    ax.set_xlim(-1, T)
    ax.set_ylim(-1.0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"attention graph (top {k} per token; arrow i -> j: token i attends to j)",
                 fontsize=10)
    out = Path(out)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- CLI


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


def main(args) -> int:
    from gptfast.cli import UserError, load_model_for_cli

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
