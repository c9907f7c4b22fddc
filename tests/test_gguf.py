"""GGUF export (gptfast.gguf): layout, metadata, exact round-trips, q8_0 against ggml's reference,
refusals, atomic writes, the CLI; and (opt-in, slow) llama.cpp's greedy tokens = gptfast's."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from gptfast.cli import main
from gptfast.config import GPTConfig
from gptfast.gguf import dequantize_q8_0, quantize_q8_0, save_gguf
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer, gpt2_data_files


def _model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50257)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tiny():
    return _model()


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader, key):
    return reader.fields[key].contents()


EXPECTED_NAMES = (["token_embd.weight", "position_embd.weight"]
                  + [f"blk.{i}.{n}.{p}" for i in range(2)
                     for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                     for p in ("weight", "bias")]
                  + ["output_norm.weight", "output_norm.bias"])


def test_layout_metadata_and_tokenizer(tiny, tmp_path):
    p = save_gguf(tiny, tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(str(p))
    assert [t.name for t in r.tensors] == EXPECTED_NAMES  # tied: no output.weight
    ts = {t.name: t for t in r.tensors}
    # ggml ne order (innermost first), as llama.cpp's gpt2 loader asks for them
    assert list(ts["token_embd.weight"].shape) == [64, 50257]
    assert list(ts["position_embd.weight"].shape) == [64, 64]
    assert list(ts["blk.0.attn_qkv.weight"].shape) == [64, 192]
    assert list(ts["blk.1.attn_output.weight"].shape) == [64, 64]
    assert list(ts["blk.0.ffn_up.weight"].shape) == [64, 256]
    assert list(ts["blk.0.ffn_down.weight"].shape) == [256, 64]
    assert list(ts["blk.0.ffn_up.bias"].shape) == [256]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    want = {"general.architecture": "gpt2", "gpt2.context_length": 64, "gpt2.embedding_length": 64,
            "gpt2.feed_forward_length": 256, "gpt2.block_count": 2, "gpt2.attention.head_count": 4,
            "general.file_type": 0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": 50256, "tokenizer.ggml.eos_token_id": 50256}
    for k, v in want.items():
        assert _field(r, k) == v, k
    assert _field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    merges = _field(r, "tokenizer.ggml.merges")
    vocab_bpe, encoder_json = gpt2_data_files()
    enc = json.loads(encoder_json.read_text(encoding="utf-8"))
    assert len(tokens) == 50257 and all(tokens[i] == s for s, i in enc.items())
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert types[0] == gguf.TokenType.NORMAL and tokens[198] == "\u010a"  # "\n" in byte-level BPE
    assert len(merges) == 50000 and merges[0] == "\u0120 t"  # vocab.bpe's first merge: "Ġ t"
    # The token list is the tokenizer's: ids of a text map to the file's token strings.
    ids = GPT2Tokenizer().encode("Hello world")
    assert [tokens[i] for i in ids] == ["Hello", "\u0120world"]


def test_f32_roundtrip_is_bit_exact(tiny, tmp_path):
    from gptfast.gguf import gguf_tensor_map

    ts = _tensors(save_gguf(tiny, tmp_path / "m.gguf", dtype="f32"))
    for name, w in gguf_tensor_map(tiny):
        got = torch.from_numpy(np.array(ts[name].data)).reshape(w.shape)
        assert torch.equal(got, w.detach()), name


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_types_are_the_rounded_weights(tiny, tmp_path, dtype):
    from gptfast.gguf import gguf_tensor_map

    tdt = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ts = _tensors(save_gguf(tiny, tmp_path / "m.gguf", dtype=dtype))
    for name, w in gguf_tensor_map(tiny):
        t = ts[name]
        if w.dim() == 1 or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # the converter's rule
            continue
        assert t.tensor_type.name == dtype.upper(), name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
        assert torch.equal(got, w.detach().to(tdt).float()), name  # round-to-nearest-even, as torch


def test_q8_0_matches_ggml_reference_and_half_step(tiny, tmp_path):
    from gptfast.gguf import gguf_tensor_map

    ts = _tensors(save_gguf(tiny, tmp_path / "m.gguf", dtype="q8_0"))
    for name, w in gguf_tensor_map(tiny):
        t = ts[name]
        if w.dim() == 1 or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        w = w.detach()
        # bytes = gguf-py's port of ggml's quantize_row_q8_0_ref, bit for bit
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.array(t.data), ref), name
        d, q = quantize_q8_0(w)
        mine = dequantize_q8_0(d, q)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(w.shape)
        assert torch.equal(got, mine), name
        # error: half a step of the fp32 scale, plus |q| times the scale's fp16 rounding
        blocks = w.reshape(w.shape[0], -1, 32)
        d32 = blocks.abs().amax(-1, keepdim=True) / 127
        d16 = d.float().unsqueeze(-1)
        bound = 0.5 * d32 + q.abs().float() * (d16 - d32).abs() + 1e-7 * blocks.abs()
        err = (got.reshape(blocks.shape) - blocks).abs()
        assert (err <= bound).all(), name


def test_q8_0_rounds_half_away_from_zero_like_roundf():
    # d = 127 / 127 = 1: q = roundf(x). torch.round (half to even) would give 2, -2, 0, 0.
    x = torch.zeros(32)
    x[:6] = torch.tensor([127.0, 2.5, -2.5, 0.5, 0.49999997, -126.5])
    d, q = quantize_q8_0(x)
    assert d.item() == 1.0
    assert q[0, :6].tolist() == [127, 3, -3, 1, 0, -127]
    ref = gguf.quants.quantize(x.numpy()[None], gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ref[0, 2:8].view(np.int8), q[0, :6].numpy())
    d, q = quantize_q8_0(torch.zeros(64))  # an all-zero block: d = 0, q = 0 (no division by zero)
    assert d.tolist() == [0.0, 0.0] and q.abs().sum() == 0


def test_untied_head_and_no_bias(tmp_path):
    m = _model(tie_weights=False, bias=False)
    ts = _tensors(save_gguf(m, tmp_path / "m.gguf"))
    assert "output.weight" in ts
    head = torch.from_numpy(np.array(ts["output.weight"].data)).reshape(50257, 64)
    assert torch.equal(head, m.lm_head.weight.detach())
    assert not torch.equal(head, m.transformer.wte.weight.detach())
    for name in ("blk.0.attn_qkv.bias", "blk.1.ffn_up.bias", "output_norm.bias"):
        assert not np.array(ts[name].data).any(), name  # explicit zero biases: the same function


def test_refusals(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    from gptfast.errors import UserError

    with pytest.raises(ValueError, match="dtype must be one of f32, f16, bf16, q8_0, q4_0, got 'q5_0'") as e:
        save_gguf(tiny, out, dtype="q5_0")
    assert isinstance(e.value, UserError)  # the CLI prints it as one line
    with pytest.raises(ValueError, match="CharTokenizer cannot be written"):
        save_gguf(tiny, out, tokenizer=CharTokenizer("ab"))
    with pytest.raises(ValueError, match="vocab_size is 65, expected >= 50257"):
        save_gguf(_model(vocab_size=65), out)
    erf = _model()
    erf.config.activation = "gelu"  # the exact-erf GELU (issue #21): llama.cpp's gpt2 graph has tanh
    with pytest.raises(ValueError, match="config.activation 'gelu' cannot be exported"):
        save_gguf(erf, out)
    bad = _model()
    with torch.no_grad():
        bad.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight holds NaN"):
        save_gguf(bad, out)
    with pytest.raises(ValueError, match="is a directory"):
        save_gguf(tiny, tmp_path)
    with pytest.raises(TypeError, match="must be a gptfast GPT"):
        save_gguf(torch.nn.Linear(2, 2), out)
    assert not out.exists()


def test_write_is_atomic(tiny, tmp_path, monkeypatch):
    import gptfast.gguf as G

    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's previous file")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(G, "_q8_0_bytes", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_gguf(tiny, out, dtype="q8_0")
    assert out.read_bytes() == b"the user's previous file"
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary left behind
    monkeypatch.undo()
    save_gguf(tiny, out, dtype="f16")
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 1


def test_cli_export_gguf(tiny, tmp_path, capsys):
    from gptfast.io import save_pretrained

    ckpt = save_pretrained(tiny, tmp_path / "hf")
    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 7
    assert [t.name for t in r.tensors] == EXPECTED_NAMES
    # a character-level checkpoint is refused with the reason, exit status 2
    assert main(["export-gguf", "--preset", "tiny", "--out", str(tmp_path / "c.gguf")]) == 2
    assert "CharTokenizer cannot be written to GGUF" in capsys.readouterr().err
    assert not (tmp_path / "c.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_gptfast(tmp_path):
    """llama.cpp (llama-cpp-python, the opt-in `peers` extra) runs the exported fp32 file and picks
    the same greedy tokens as gptfast. An untied head scaled up so the logits have clear winners (a
    fresh init's near-flat logits would let fp32 summation order flip an argmax; a scaled tied head
    would just repeat the last token whatever the attention does)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="opt-in peer: pip install 'gptfast[peers]'")
    from gptfast import generate

    m = _model(seed=1, n_layer=2, n_head=4, n_embd=64, block_size=128, tie_weights=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    p = save_gguf(m, tmp_path / "m.gguf", dtype="f32")
    prompt = GPT2Tokenizer().encode("The quick brown fox jumps over the lazy dog")
    want = generate(m, [prompt], 24, temperature=0.0)[0]
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=128, n_threads=2, logits_all=False, verbose=False)
    got = []
    llm.reset()
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(int(tok))
        if len(got) == 24:
            break
    assert got == list(want)
    assert len(set(want)) > 3  # not a degenerate repeat: the comparison means something
