"""Perplexity of a fixed-length causal LM on a long text, with a sliding window.

Follows Hugging Face's "Perplexity of fixed-length models" guide
(https://huggingface.co/docs/transformers/perplexity): the text is cut into windows of at most
`max_length` tokens that start every `stride` tokens; each window scores only the tokens that no
earlier window scored, so every token is scored once, with up to `max_length - stride` tokens of
extra context. The NLL is summed per scored token (a window's mean weighted by its count), and
PPL = exp(total NLL / tokens scored).

Which tokens are scored: the first window scores all its tokens but the first (nothing predicts
it). A later window [begin, end) scores the positions [max(prev_end, begin + 1), end): with
stride < max_length that is [prev_end, end), all with context inside the window; with
stride == max_length the windows are independent chunks and each chunk's first token, having no
context in its chunk, is not scored (exactly the HF guide's count for that case). HF's code
subtracts one token per window for the label shift even when the window's first position is
already masked; we count the tokens actually scored, so the weighting is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gptfast.errors import InputError


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows `(begin, end, score_from)` for a text of `n` tokens: the model sees
    ids[begin:end] and scores the targets at positions score_from..end-1. Windows that would
    score nothing (a 1-token chunk) are dropped."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            out.append((begin, end, score_from))
        prev_end = end
        if end == n:
            break
    return out


def _as_ids(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(ids))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise InputError(f"sliding_window_perplexity: ids must be 1-D token ids, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"sliding_window_perplexity: ids must be integer token ids, got {t.dtype}")
    return t.to(torch.long)


@torch.no_grad()
def sliding_window_perplexity(
    model: torch.nn.Module,
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> tuple[float, int]:
    """Perplexity of `model` on the token sequence `ids`.

    Args:
        model: a causal LM whose forward(idx (B, T) int64) returns (logits (B, T, V), ...)
            (a `gptfast.GPT`); run in eval mode on the device of its parameters.
        ids: 1-D token ids (list, numpy array or tensor of shape (N,)), N >= 2.
        max_length: window length (default and maximum: the model's block size).
        stride: distance between window starts, 1 <= stride <= max_length (default
            max_length // 2). Smaller = more context per token, more compute.
        batch_size: windows of equal length evaluated together.
        progress: show a tqdm bar over the windows.

    Returns:
        (perplexity, number of tokens scored). With stride < max_length every token but the
        first is scored (N - 1); with stride == max_length, N minus the number of chunks.
    """
    t = _as_ids(ids)
    n = t.numel()
    if n < 2:
        raise InputError(f"sliding_window_perplexity: need at least 2 tokens, got {n}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if max_length is None:
        if block_size is None:
            raise InputError("sliding_window_perplexity: pass max_length (the model has no config.block_size)")
        max_length = block_size
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InputError(f"sliding_window_perplexity: max_length must be an int >= 2, got {max_length!r}")
    if block_size is not None and max_length > block_size:
        raise InputError(f"sliding_window_perplexity: max_length {max_length} exceeds the model's "
                         f"block size {block_size}")
    if stride is None:
        stride = max(1, max_length // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise InputError(f"sliding_window_perplexity: stride must be an int in [1, max_length={max_length}], "
                         f"got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"sliding_window_perplexity: batch_size must be an int >= 1, got {batch_size!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise InputError(f"sliding_window_perplexity: token ids must be in [0, {vocab}), got "
                         f"[{int(t.min())}, {int(t.max())}]")

    windows = sliding_windows(n, max_length, stride)
    # Consecutive windows of the same length go into one batch (only the last one can differ).
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and \
                (batches[-1][0][1] - batches[-1][0][0]) == (w[1] - w[0]):
            batches[-1].append(w)
        else:
            batches.append([w])
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    was_training = getattr(model, "training", False)
    model.eval()
    nll_sum = 0.0  # Python float (double) accumulator: fp32 sums drift on long texts
    n_scored = 0
    bar = None
    if progress:
        bar = _Progress(len(windows))
    try:
        for batch in batches:
            x = torch.stack([t[b:e] for b, e, _ in batch]).to(device)  # (B, T)
            logits = model(x)[0].float()  # (B, T, V)
            logp = F.log_softmax(logits[:, :-1], dim=-1)  # position i predicts token i + 1
            tok_logp = logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            for row, (b, e, s) in enumerate(batch):
                # target position p (absolute) is predicted at window index p - b - 1
                nll_sum -= float(tok_logp[row, s - b - 1:e - b - 1].double().sum())
                n_scored += e - s
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return math.exp(nll_sum / n_scored), n_scored


PROGRESS_INTERVAL_S = 10.0  # seconds between progress lines when stderr is not a terminal


class _Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) a plain line on stderr about every
    `PROGRESS_INTERVAL_S` seconds, so long runs are never silent."""

    def __init__(self, total: int, desc: str = "perplexity") -> None:
        import sys
        import time

        self.total, self.done, self.desc, self.interval = total, 0, desc, PROGRESS_INTERVAL_S
        self._time = time.perf_counter
        self.t0 = self.t_last = self._time()
        self.bar = None
        self.stream = sys.stderr
        if getattr(sys.stderr, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="window")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self._time()
        if now - self.t_last >= self.interval or self.done == self.total:
            self.t_last = now
            el = now - self.t0
            left = el / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} windows ({100 * self.done / self.total:.0f}%), "
                  f"{el:.0f} s elapsed, ~{left:.0f} s left", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
