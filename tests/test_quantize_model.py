"""gptfast.quantize with the int8 / int4 formats (issue #20): the module swap (QuantLinear,
QuantEmbedding sharing the tied head's packed tensors, head=False), the forward equal to the model
on the dequantized weights (the project's fp64 rule), errors, and KV-cached greedy generation
equal to `generate_reference` on the same quantized model on every CPU backend with the op."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import gptfast
from gptfast import ops
from gptfast.config import GPTConfig
from gptfast.errors import InputError
from gptfast.generation import generate_reference
from gptfast.model import GPT
from gptfast.ops import quant
from gptfast.quantize import FORMATS, QUANT_FORMATS, QuantEmbedding, QuantLinear, quantize, weight_bytes
from tests.helpers import assert_error_within


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine (see tests/test_engine.py)
    yield
    torch.set_num_threads(n)


def _model(preset="tiny", backend="torch", seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, dropout=0.0, **overrides), backend=backend).eval()


def _small(**kw) -> GPT:
    # widths divisible by 128 so every format applies; a short block so generation slides;
    # random biases (GPT's init zeroes them, and a dropped bias must show)
    model = _model("tiny", n_embd=128, n_head=4, block_size=24, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def _dequantized_copy(model: GPT, q: GPT) -> GPT:
    """The fp32 model whose matrices are q's dequantized weights (what q computes with)."""
    d = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QuantLinear):
                d.get_submodule(name).weight.copy_(m.dequantized_weight())
    return d


QFMTS = list(QUANT_FORMATS)


def test_formats_table():
    assert FORMATS == ("bf16", "int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128",
                       "int4-g32-zp", "int4-g64-zp", "int4-g128-zp")


@pytest.mark.parametrize("fmt", QFMTS)
def test_swap_layout_and_tied_head_is_one_copy(fmt):
    model = _small()
    bits, group_size, zp = QUANT_FORMATS[fmt]
    q = quantize(copy.deepcopy(model), fmt)
    assert q.weight_format == fmt and q.quantized_head is True
    lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(lins) == 4 * model.config.n_layer + 1  # every block's four and the LM head
    assert not any(type(m) is nn.Linear or isinstance(m, nn.Linear) for m in q.modules())
    for m in lins:
        assert (m.bits, m.group_size, m.weight_format, m.backend) == (bits, group_size, fmt, "torch")
        assert m.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert (m.zero is not None) == zp
    wte = q.transformer.wte
    assert isinstance(wte, QuantEmbedding)
    assert wte.tied_to is q.lm_head and not list(wte.buffers())  # reads the head's buffers
    assert not any(k.startswith("transformer.wte.") for k in q.state_dict())  # stored once, as lm_head.*
    # biases, LayerNorm and the position embedding stay fp32
    assert q.transformer.h[0].attn.c_attn.bias.dtype == torch.float32 and q.dtype == torch.float32
    # bytes: packed matrices, each once (the head once)
    n_mat = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    n_rest = sum(p.numel() for n, p in model.named_parameters() if not (p.dim() == 2 and "wpe" not in n))
    scales = sum(m.scale.numel() * m.scale.element_size() * (2 if zp else 1) for m in lins)
    assert weight_bytes(q) == n_mat * bits // 8 + scales + 4 * n_rest
    # the model's backend setter reaches the swapped layers
    q.backend = "reference"
    assert all(m.backend == "reference" for m in lins)


@pytest.mark.parametrize("fmt", QFMTS)
def test_forward_is_the_model_on_dequantized_weights(fmt):
    """The truth: the fp32 model's forward in fp64 on q's dequantized weights; the baseline: the
    same model in fp32 (plain PyTorch)."""
    model = _small(backend="reference")
    q = quantize(copy.deepcopy(model), fmt)
    d = _dequantized_copy(model, q)
    idx = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = copy.deepcopy(d).double()(idx)[0]
        baseline = d(idx)[0]
        for backend in ("reference", "torch"):
            q.backend = backend
            assert_error_within(q(idx)[0], truth, baseline, what=f"{fmt} {backend}")


@pytest.mark.parametrize("fmt", ["int8", "int4-g32-zp"])
def test_embedding_lookup_is_the_dequantized_rows(fmt):
    q = quantize(_small(), fmt)
    idx = torch.tensor([[3, 0, 64, 3], [1, 2, 5, 7]])
    w = q.lm_head.dequantized_weight()
    assert torch.equal(q.transformer.wte(idx), w[idx])


def test_head_false_keeps_the_tied_head_in_fp32():
    model = _small()
    q = quantize(copy.deepcopy(model), "int4-g32", head=False)
    assert q.quantized_head is False
    assert type(q.lm_head) is type(model.lm_head) and type(q.transformer.wte) is nn.Embedding
    assert q.lm_head.weight is q.transformer.wte.weight
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert isinstance(q.transformer.h[0].mlp.c_fc, QuantLinear)
    n_head = model.lm_head.weight.numel()
    assert weight_bytes(q) > weight_bytes(quantize(copy.deepcopy(model), "int4-g32")) + 3 * n_head
    # bf16 too
    b = quantize(copy.deepcopy(model), "bf16", head=False)
    assert b.lm_head.weight.dtype == torch.float32 and b.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16


def test_untied_head_and_embedding_are_quantized_separately():
    model = _model("tiny", n_embd=64, tie_weights=False)
    q = quantize(copy.deepcopy(model), "int8-g32")
    assert isinstance(q.lm_head, QuantLinear) and isinstance(q.transformer.wte, QuantEmbedding)
    assert q.transformer.wte.tied_to is None and q.transformer.wte.qweight is not q.lm_head.qweight
    want = quant.quantize_weight(model.transformer.wte.weight, 8, 32)
    assert torch.equal(q.transformer.wte.qweight, want[0]) and torch.equal(q.transformer.wte.scale, want[1])


def test_quantize_errors_and_idempotence():
    model = _small()
    with pytest.raises(InputError, match=r"fmt must be one of .*'int4-g32'.*got 'int3'"):
        quantize(model, "int3")
    with pytest.raises(InputError, match="head must be a bool, got 1"):
        quantize(model, "int8", head=1)
    with pytest.raises(InputError, match="act_int8 is an option of the int8 / int4 formats"):
        quantize(model, "bf16", act_int8=True)
    odd = _model("tiny", n_embd=96, n_head=4)  # 96: no int4-g64 groups
    before = copy.deepcopy(odd.state_dict())
    with pytest.raises(InputError, match=r"divisible by 64; got lm_head \(96\), transformer.h.0.attn.c_attn \(96\), "):
        quantize(odd, "int4-g64")
    assert getattr(odd, "weight_format", None) is None  # nothing swapped
    assert all(torch.equal(v, odd.state_dict()[k]) for k, v in before.items())
    q = quantize(model, "int8")
    assert quantize(q, "int8") is q
    with pytest.raises(InputError, match="already in format 'int8'"):
        quantize(q, "int4-g32")
    with pytest.raises(InputError, match="already in format 'int8' with head=True"):
        quantize(q, "int8", head=False)


def test_act_int8_reaches_the_layers():
    q = quantize(_small(), "int8-g32", act_int8=True)
    assert all(m.act_int8 for m in q.modules() if isinstance(m, QuantLinear))


def _gen_backends() -> list[str]:
    """Every CPU backend that runs quantized_linear for the test's formats (triton's interpreter
    is too slow for a generation loop: its kernels are tested in tests/test_triton_quant*.py)."""
    out = []
    for b in ("reference", "torch", "native"):
        if all(ops.unavailable_reason(b, "quantized_linear", "cpu", dtype=torch.float32, bits=bits,
                                      group_size=g, zero=zp, act_int8=False) is None
               for bits, g, zp in QUANT_FORMATS.values()):
            out.append(b)
    return out + ["auto"]


@pytest.fixture(scope="module")
def shipped():
    from gptfast.io import default_model

    return default_model()  # trained: its greedy text varies (a random model's repeats one token)


def _greedy_check(q, prompts, n, fmt):
    stats: dict = {}
    got = gptfast.generate(q, prompts, n, temperature=0.0, stats=stats)
    assert stats["weight_format"] == fmt
    assert len(set(got[0])) > 8  # real text, not one repeated token
    for p, row in zip(prompts, got):
        want = generate_reference(q, torch.tensor([p]), n, temperature=0.0)
        assert row == want[0, len(p):].tolist(), (p, row, want[0, len(p):].tolist())
    return got


@pytest.mark.parametrize("backend", _gen_backends())
@pytest.mark.parametrize("fmt", ["int8", "int8-g32", "int4-g32", "int4-g64-zp"])
def test_greedy_generation_equals_reference_on_the_quantized_model(shipped, fmt, backend):
    """gptfast.generate (KV cache, batched prompts of different lengths) and GPT.generate give each
    row what generate_reference (no cache) gives on the same quantized model (the shipped
    Shakespeare model)."""
    model, tok = shipped
    q = quantize(copy.deepcopy(model), fmt)
    q.backend = backend
    prompts = [tok.encode("ROMEO:\nWhat say"), tok.encode("\n")]
    got = _greedy_check(q, prompts, 40, fmt)
    t = q.generate(torch.tensor([prompts[1]]), 20, temperature=0.0)
    assert t[0, 1:].tolist() == got[1][:20]


def test_greedy_generation_slides_past_the_block_on_a_quantized_model(shipped):
    model, tok = shipped
    q = quantize(copy.deepcopy(model), "int4-g32")
    _greedy_check(q, [tok.encode("ROMEO:\nWhat say")], 120, "int4-g32")  # 14 + 120 > block 128


def test_reference_and_torch_are_in_the_generation_backends():
    assert {"reference", "torch", "auto"} <= set(_gen_backends())
