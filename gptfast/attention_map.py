"""Attention maps: what each head of a GPT looks at, as heatmaps or as a graph.

    from gptfast.attention_map import attention_probs, plot_attention
    probs = attention_probs(model, idx)             # (n_layer, B, H, T, T)
    probs = attention_probs(model, idx, layer=-1)   # (1, B, H, T, T), last layer only

    gptfast attention-map --text "To be, or not to be" --out map.png            # every layer x head
    gptfast attention-map --text "To be, or not to be" --layer 3 --head 1 --graph --out g.png

The probabilities come from the model's own attention modules: the model runs its forward once
and each attention layer's input is handed to that layer's `attention_probs` (its own q, k through
`gptfast.ops.reference.attention_probs`: softmax(q k^T / sqrt(hs)) with the causal mask). This is
the matrix the model's fused attention kernels apply without ever storing it, so the map is exact
(up to fp32 rounding) whatever backend the model runs on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from gptfast.errors import InputError
from gptfast.io.atomic import write_file_atomic


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
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n_layer <= layer < n_layer:
            raise InputError(f"attention_probs: layer must be an int in [{-n_layer}, {n_layer - 1}], got {layer!r}")
        layer %= n_layer
    B, T = idx.shape
    if T > model.config.block_size:
        raise InputError(f"attention_probs: sequence length {T} exceeds the block size {model.config.block_size}")
    if T == 0:
        raise InputError("attention_probs: idx holds no tokens")
    wanted = range(n_layer) if layer is None else [layer]
    out: dict[int, torch.Tensor] = {}

    def recorder(i):  # each attention module computes its own probabilities from its input
        def hook(module, args):
            out[i] = module.attention_probs(args[0])
        return hook

    handles = [blocks[i].attn.register_forward_pre_hook(recorder(i)) for i in wanted]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return torch.stack([out[i] for i in wanted])  # (L, B, nh, T, T)


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
    write_file_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110))  # the user's file: replaced whole or not at all
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
    write_file_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110))  # the user's file: replaced whole or not at all
    plt.close(fig)
    return out
