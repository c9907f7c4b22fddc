"""Tests of gptfast.attention_map: the probabilities are the model's own, and the plots are images."""

from __future__ import annotations

import pytest
import torch

from gptfast import ops
from gptfast.attention_map import attention_probs, token_labels
from gptfast.cli import main
from gptfast.config import GPTConfig
from gptfast.model import GPT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(vocab=65, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=48, vocab_size=vocab, **kw)
    # the `torch` backend: `auto` could pick `native`, whose first use may JIT-build C++ for a minute
    return GPT(cfg, backend="torch").eval()


def _check_stochastic_causal(p: torch.Tensor) -> None:
    """Rows sum to 1, the upper triangle is exactly 0, everything in [0, 1]."""
    T = p.shape[-1]
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (p[..., upper] == 0).all()
    assert (p >= 0).all() and (p <= 1).all()
    # not a trivial matrix: at least one row spreads its weight over several tokens
    assert (p[..., -1, :] < 0.999).any()


def test_shapes_rows_sum_to_one_random_model():
    model = _tiny()
    idx = torch.randint(0, 65, (2, 20), generator=torch.Generator().manual_seed(1))
    p = attention_probs(model, idx)
    assert p.shape == (3, 2, 4, 20, 20)
    _check_stochastic_causal(p)
    last = attention_probs(model, idx, layer=-1)
    assert last.shape == (1, 2, 4, 20, 20)
    torch.testing.assert_close(last[0], p[2], atol=0, rtol=0)
    torch.testing.assert_close(attention_probs(model, idx, layer=1)[0], p[1], atol=0, rtol=0)
    # a (T,) tensor is one sequence
    assert attention_probs(model, idx[0]).shape == (3, 1, 4, 20, 20)


def test_char_model_rows_sum_to_one():
    from gptfast.io.checkpoint import default_model

    model, tok = default_model()
    model.backend = "torch"
    ids = tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    p = attention_probs(model, torch.tensor([ids]))
    assert p.shape == (model.config.n_layer, 1, model.config.n_head, len(ids), len(ids))
    _check_stochastic_causal(p)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_probs_reproduce_the_models_attention(monkeypatch, backend):
    """probs @ v equals what the model's attention op returns inside a normal forward pass."""
    model = _tiny()
    model.backend = backend
    captured = []
    real = ops.causal_attention

    def spy(q, k, v, *a, **kw):
        y = real(q, k, v, *a, **kw)
        captured.append((v.detach(), y.detach()))
        return y

    monkeypatch.setattr(ops, "causal_attention", spy)
    idx = torch.randint(0, 65, (2, 17), generator=torch.Generator().manual_seed(2))
    model(idx)
    monkeypatch.setattr(ops, "causal_attention", real)
    p = attention_probs(model, idx)
    assert len(captured) == 3
    for layer, (v, y) in enumerate(captured):
        torch.testing.assert_close(p[layer] @ v.float(), y.float(), atol=2e-6, rtol=1e-5)


def test_training_mode_is_restored_and_dropout_ignored():
    model = _tiny(dropout=0.5).train()
    idx = torch.randint(0, 65, (1, 12), generator=torch.Generator().manual_seed(3))
    p1 = attention_probs(model, idx)
    p2 = attention_probs(model, idx)
    assert model.training
    torch.testing.assert_close(p1, p2, atol=0, rtol=0)  # deterministic: dropout off inside
    _check_stochastic_causal(p1)


def test_bad_arguments():
    model = _tiny()
    idx = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="layer must be an int in \\[-3, 2\\]"):
        attention_probs(model, idx, layer=3)
    with pytest.raises(ValueError, match="exceeds the block size 48"):
        attention_probs(model, torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be \\(B, T\\)"):
        attention_probs(model, torch.zeros(1, 2, 3, dtype=torch.long))


def _am(*argv) -> int:
    """`gptfast attention-map ...` on the torch backend (`auto` could JIT-build `native` first)."""
    return main(["attention-map", "--backend", "torch", *argv])


def _assert_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_cli_heatmaps_and_graph(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert _am("--preset", "tiny", "--text", "To be, or not", "--out", str(out)) == 0
    _assert_png(out)
    one = tmp_path / "one.png"
    assert _am("--preset", "tiny", "--text", "To be", "--layer", "1", "--head", "2",
                 "--out", str(one)) == 0
    _assert_png(one)
    graph = tmp_path / "graph.png"
    assert _am("--preset", "tiny", "--text", "To be, or not", "--graph", "--top", "2",
                 "--out", str(graph)) == 0
    _assert_png(graph)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layer", "7"], "--layer must be in [0, 1]"),
    (["--head", "4"], "--head must be in [0, 3]"),
    (["--text", "é"], "é"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    assert _am("--preset", "tiny", "--out", str(tmp_path / "x.png"), *argv) == 2
    assert message in capsys.readouterr().err


def test_gpt2_bpe_tokenizer_path(tmp_path):
    """A tiny random model over GPT-2's 50,257-token vocabulary, saved and loaded as a checkpoint:
    the labels are the decoded BPE pieces (which concatenate back to the text)."""
    from gptfast.io.checkpoint import save_checkpoint
    from gptfast.tokenizers import GPT2Tokenizer

    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257), backend="torch")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    text = "Hello world, attention is all you need."
    ids = tok.encode(text)
    labels = token_labels(tok, ids)
    assert len(labels) == len(ids) < len(text)  # BPE pieces, not characters
    assert "".join(labels).replace("␣", " ") == text
    assert "␣world" in labels
    out = tmp_path / "bpe.png"
    assert _am("--checkpoint", str(ckpt), "--text", text, "--out", str(out)) == 0
    _assert_png(out)
