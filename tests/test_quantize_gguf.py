"""GGUF export of quantized models (issue #20): int8-g32 as q8_0 and int4-g32 as q4_0, blocks
copied (gguf-py's dequantizer, a port of ggml's, reads back exactly gptfast's dequantized weights),
an fp32 model's q4_0 against gguf-py's port of ggml's q4_0 quantizer, refusals; and (slow)
llama.cpp running the exports with gptfast's greedy tokens."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

import gptfast
from gptfast.config import GPTConfig
from gptfast.errors import GGUFExportError
from gptfast.gguf import gguf_tensor_map, save_gguf
from gptfast.model import GPT
from gptfast.ops import quant
from gptfast.quantize import quantize
from gptfast.tokenizers import GPT2Tokenizer


def _model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=50257)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tiny():
    return _model()


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _dense(path, name, shape) -> torch.Tensor:
    t = _tensors(path)[name]
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)


MATRICES = {  # GGUF name -> our module path
    "token_embd.weight": "lm_head",
    "blk.0.attn_qkv.weight": "transformer.h.0.attn.c_attn",
    "blk.1.attn_output.weight": "transformer.h.1.attn.c_proj",
    "blk.0.ffn_up.weight": "transformer.h.0.mlp.c_fc",
    "blk.1.ffn_down.weight": "transformer.h.1.mlp.c_proj",
}


@pytest.mark.parametrize("fmt,ggml", [("int8-g32", "Q8_0"), ("int4-g32", "Q4_0")])
def test_quantized_blocks_are_copied(tiny, tmp_path, fmt, ggml):
    q = quantize(copy.deepcopy(tiny), fmt)
    p = save_gguf(q, tmp_path / "m.gguf")  # dtype: the model's own type
    ts = _tensors(p)
    assert "output.weight" not in ts  # tied: the head is token_embd
    for name, path in MATRICES.items():
        m = q.get_submodule(path)
        assert ts[name].tensor_type.name == ggml, name
        want = m.dequantized_weight()
        got = _dense(p, name, tuple(want.shape))
        assert torch.equal(got, want), name  # llama.cpp computes with gptfast's weights exactly
    for name in ("blk.0.attn_qkv.bias", "position_embd.weight", "output_norm.weight"):
        assert ts[name].tensor_type == gguf.GGMLQuantizationType.F32
    assert gguf.GGUFReader(str(p)).fields["general.file_type"].contents() == int(
        getattr(gguf.LlamaFileType, f"MOSTLY_{ggml}"))


def test_fp32_model_as_q4_0_is_ggml_q4_0(tiny, tmp_path):
    """dtype='q4_0' on an fp32 model quantizes with gptfast.ops.quant. Against gguf-py's port of
    ggml's quantize_row_q4_0_ref: the same scales (llama.cpp's sign rule d = max / -8) and nibble
    order; a nibble may differ by one level where w / d sits within d's float16 rounding of a
    rounding boundary (ggml divides by the unrounded d, gptfast by the stored one, which gives the
    nearer level for the weight llama.cpp actually computes with)."""
    p = save_gguf(tiny, tmp_path / "m.gguf", dtype="q4_0")
    ts = _tensors(p)
    for name, path in list(MATRICES.items())[1:]:  # the projections (gguf-py's numpy quantizer is slow on the 50257-row embedding)
        w = tiny.get_submodule(path).weight.detach()
        t = ts[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        ours = np.array(t.data).reshape(w.shape[0], -1, 18)
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(ours.shape)
        assert np.array_equal(ours[..., :2], ref[..., :2]), name  # the fp16 scales, bit for bit

        def nibbles(b):
            return np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], axis=-1).astype(np.int16)

        diff = np.abs(nibbles(ours) - nibbles(ref))
        assert diff.max() <= 1 and diff.mean() < 0.01, (name, diff.max(), diff.mean())
        qw, sc, _ = quant.quantize_weight(w, 4, 32)
        dense = quant.dequantize_weight(qw, sc, None, 4, 32)
        assert torch.equal(_dense(p, name, tuple(w.shape)), dense)
        # the stored-scale rule never has the larger error of the two
        ref_dense = torch.from_numpy(gguf.quants.dequantize(ref.reshape(w.shape[0], -1), t.tensor_type)).reshape(w.shape)
        assert bool(((dense - w).abs() <= (ref_dense - w).abs() + 1e-9).all()), name


def test_head_false_and_bf16(tiny, tmp_path):
    q = quantize(copy.deepcopy(tiny), "int8-g32", head=False)
    ts = _tensors(save_gguf(q, tmp_path / "a.gguf"))
    assert ts["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ts["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    b = quantize(copy.deepcopy(tiny), "bf16")
    p = save_gguf(b, tmp_path / "b.gguf")
    assert _tensors(p)["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert torch.equal(_dense(p, "blk.0.ffn_up.weight", (256, 64)), b.transformer.h[0].mlp.c_fc.weight.float())


def test_untied_quantized_head(tmp_path):
    m = quantize(_model(tie_weights=False), "int4-g32")
    p = save_gguf(m, tmp_path / "m.gguf")
    want = m.lm_head.dequantized_weight()
    assert torch.equal(_dense(p, "output.weight", tuple(want.shape)), want)
    emb = m.transformer.wte
    want = quant.dequantize_weight(emb.qweight, emb.scale, None, 4, 32)
    assert torch.equal(_dense(p, "token_embd.weight", tuple(want.shape)), want)


@pytest.mark.parametrize("fmt", ["int8", "int4-g64", "int4-g32-zp", "int4-g64-zp"])
def test_other_formats_are_refused(tiny, tmp_path, fmt):
    q = quantize(copy.deepcopy(tiny), fmt)
    with pytest.raises(GGUFExportError, match=f"format '{fmt}', which has no GGUF type of the same layout"):
        save_gguf(q, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_dtype_must_be_the_models_own(tiny, tmp_path):
    q = quantize(copy.deepcopy(tiny), "int8-g32")
    with pytest.raises(GGUFExportError, match="weights are int8-g32, written as they are as q8_0; got dtype 'f16'"):
        save_gguf(q, tmp_path / "m.gguf", dtype="f16")
    assert save_gguf(q, tmp_path / "m.gguf", dtype="q8_0").exists()


def test_gguf_tensor_map_names_quantized_modules(tiny):
    q = quantize(copy.deepcopy(tiny), "int4-g32")
    names = dict(gguf_tensor_map(q))
    assert names["blk.0.ffn_up.weight"] is q.transformer.h[0].mlp.c_fc
    assert names["token_embd.weight"] is q.transformer.wte


# ----------------------------------------------------------------------------- llama.cpp (slow)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # not a skip: a slow run asked for this comparison
        raise AssertionError("this slow test needs llama-cpp-python (pip install 'gptfast[peers]'); "
                             f"it is not importable here ({e})") from None
    return llama_cpp


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8-g32", "int4-g32"])
def test_llama_cpp_runs_the_export_with_gptfasts_greedy_tokens(tmp_path, fmt):
    """llama.cpp loads the q8_0 (q4_0) file written from gptfast's int8-g32 (int4-g32) model and
    picks the same greedy tokens as gptfast on that model (an untied head scaled up so the logits
    have clear winners, as tests/test_gguf.py's fp32 check)."""
    llama_cpp = _llama_cpp()
    m = _model(seed=1, tie_weights=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    q = quantize(m, fmt)
    p = save_gguf(q, tmp_path / "m.gguf")
    prompt = GPT2Tokenizer().encode("The quick brown fox jumps over the lazy dog")
    n = 16
    want = gptfast.generate(q, [prompt], n, temperature=0.0)[0]
    llm = llama_cpp.Llama(model_path=str(p), n_ctx=128, n_threads=2, logits_all=False, verbose=False)
    got = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(int(tok))
        if len(got) == n:
            break
    assert len(set(want)) > 3  # not a degenerate repeat
    assert got == list(want)
