"""Sliding-window perplexity (Hugging Face's "Perplexity of fixed-length models" procedure)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptfast.io import checkpoint as ckpt
from gptfast.cli import main as cli_main
from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.perplexity import sliding_window_perplexity, sliding_windows


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", block_size=32, n_layer=1), backend="torch").eval()
    # Random init predicts ~uniformly; sharpen the logits so perplexities differ clearly.
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 65, (203,), generator=g)


@pytest.mark.parametrize("n, max_length, stride, expected", [
    (100, 32, 16, 99),  # overlapping: every token but the first
    (100, 32, 10, 99),
    (100, 32, 1, 99),
    (100, 32, 32, 96),  # chunks [0,32) [32,64) [64,96) [96,100): 31 + 31 + 31 + 3
    (97, 32, 32, 93),  # the last chunk is a single token: nothing to score in it
    (32, 32, 32, 31),  # one window
    (5, 32, 16, 4),  # shorter than a window
    (2, 2, 1, 1),
])
def test_scored_token_count(model, n, max_length, stride, expected):
    ids = torch.randint(0, 65, (n,), generator=torch.Generator().manual_seed(n))
    ppl, scored = sliding_window_perplexity(model, ids, max_length=max_length, stride=stride)
    assert scored == expected
    assert math.isfinite(ppl) and ppl > 1


def test_stride_equal_max_length_is_independent_chunks(model, ids):
    L = 32
    ppl, scored = sliding_window_perplexity(model, ids, max_length=L, stride=L, batch_size=3)
    # Directly: each chunk on its own, every token but the chunk's first predicted.
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), L):
            chunk = ids[s:s + L]
            if len(chunk) < 2:
                continue
            logits, _ = model(chunk[None])
            nll += F.cross_entropy(logits[0, :-1].double(), chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    assert scored == count
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-6)


def _hf_guide_reference(model, ids, max_length, stride):
    """The guide's loop written with -100 label masks (as in the HF docs), counting the labels
    that are actually scored after the one-position shift."""
    seq_len = len(ids)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits, _ = model(input_ids)
        shift_logits, shift_labels = logits[:, :-1].double(), labels[:, 1:]
        valid = int((shift_labels != -100).sum())
        if valid:
            nll_sum += F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(),
                                       ignore_index=-100, reduction="sum").item()
            n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length, stride, batch_size", [(32, 8, 1), (32, 8, 4), (32, 31, 2), (17, 5, 3)])
def test_matches_hf_guide_loop(model, ids, max_length, stride, batch_size):
    ppl, scored = sliding_window_perplexity(model, ids, max_length=max_length, stride=stride,
                                            batch_size=batch_size)
    ref_ppl, ref_scored = _hf_guide_reference(model, ids, max_length, stride)
    assert scored == ref_scored == len(ids) - 1
    assert ppl == pytest.approx(ref_ppl, rel=1e-6)


def test_windows_cover_each_token_once():
    for n, L, s in [(100, 32, 7), (64, 16, 16), (1000, 128, 64), (33, 32, 1)]:
        scored = [t for _, e, f in sliding_windows(n, L, s) for t in range(f, e)]
        assert len(scored) == len(set(scored))
        for b, e, f in sliding_windows(n, L, s):
            assert e - b <= L and f > b  # every scored token has context inside its window


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, max_length=16, stride=17)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, max_length=16, stride=0)
    with pytest.raises(ValueError, match="block size"):
        sliding_window_perplexity(model, ids, max_length=33)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_perplexity(model, ids[:1])
    with pytest.raises(ValueError, match="1-D"):
        sliding_window_perplexity(model, ids.view(7, 29))
    with pytest.raises(ValueError, match=r"\[0, 65\)"):
        sliding_window_perplexity(model, torch.tensor([1, 2, 70]))


def test_shipped_model_smaller_stride_not_worse(shakespeare_path):
    model, tok = ckpt.default_model()
    model.backend = "torch"
    text = shakespeare_path.read_text()
    held_out = text[int(len(text) * 0.9):][:6000]
    ids = tok.encode(held_out)
    L = model.config.block_size
    ppl_chunks, n_chunks = sliding_window_perplexity(model, ids, stride=L, batch_size=16)
    ppl_slide, n_slide = sliding_window_perplexity(model, ids, stride=L // 4, batch_size=16)
    assert n_slide == len(ids) - 1 and n_chunks == len(ids) - math.ceil(len(ids) / L)
    assert ppl_slide <= ppl_chunks
    assert ppl_slide < 6.0  # a trained char model (val loss <= 1.75 -> PPL <= 5.75)


def test_cli(tmp_path, capsys, shakespeare_path):
    f = tmp_path / "t.txt"
    f.write_text(shakespeare_path.read_text()[-3000:])
    assert cli_main(["perplexity", "--text-file", str(f), "--stride", "64", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "2999 tokens scored" in out
    assert cli_main(["perplexity", "--text-file", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    f.write_text("Ça va?")
    assert cli_main(["perplexity", "--text-file", str(f)]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
