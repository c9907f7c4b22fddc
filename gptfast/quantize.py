"""Weight formats as module swaps: `quantize(model, fmt)` replaces the model's linear layers (and
the tied token embedding) with variants that hold their weights in another format, each with the
kernel that reads it; the model's forward and the generation loop never change.

As gpt-fast's `quantize.py` (github.com/pytorch-labs/gpt-fast: `WeightOnlyInt8Linear` replaces
`nn.Linear`) and Liger-Kernel's module patching. Formats:

- "bf16": weight-only bf16. Every matrix (c_attn, attn c_proj, mlp c_fc / c_proj, the LM head and
  the token embedding it is tied to) is held in bfloat16; activations, LayerNorm, biases, the
  position embedding and the KV cache stay in the model's dtype (fp32). Products are exactly fp32
  math on the bf16-rounded weights (`ops.linear` / `ops.gelu_mlp` accept bf16 weights with fp32
  inputs; the native CPU kernels widen each weight exactly and accumulate in fp32, the other
  backends widen the matrix first). A memory-bound decode step streams half the bytes. Measured
  speed and accuracy: README, docs/PERF.md.
- "int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128", "int4-g32-zp", "int4-g64-zp",
  "int4-g128-zp" (issue #20): quantized weights, `QuantLinear` (packed weight + scales, the op
  `ops.quantized_linear`; formats and layouts: `gptfast.ops.quant`). int8 per output channel is
  gpt-fast's `WeightOnlyInt8Linear`; int8-g32 is llama.cpp's q8_0, int4-g32 its q4_0 (same
  blocks: `gptfast.gguf` copies them); "-zp" adds a float16 zero point per group (gpt-fast's
  int4 groups). Activations, LayerNorm, biases, the position embedding and the KV cache stay in
  the model's dtype. `head=True` also quantizes the LM head and the token embedding tied to it
  (one packed copy, `QuantEmbedding` dequantizes the looked-up rows); `head=False` keeps them in
  the model's dtype. Accuracy and bytes per format: README ("Quantized weights").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast import ops
from gptfast.errors import InputError
from gptfast.ops.quant import dequantize_weight, quantize_weight

# quantized format -> (bits, group_size, zero point); `gptfast.ops.quant` has the layouts
QUANT_FORMATS: dict[str, tuple[int, int | None, bool]] = {
    "int8": (8, None, False),
    "int8-g32": (8, 32, False),
    "int4-g32": (4, 32, False),
    "int4-g64": (4, 64, False),
    "int4-g128": (4, 128, False),
    "int4-g32-zp": (4, 32, True),
    "int4-g64-zp": (4, 64, True),
    "int4-g128-zp": (4, 128, True),
}
FORMATS = ("bf16", *QUANT_FORMATS)


class BF16Linear(nn.Module):
    """A linear layer with a bfloat16 weight (out, in) and a bias in the activations' dtype.
    Not trainable (a buffer, not a parameter): an inference format."""

    weight_format = "bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bf16"


class BF16Embedding(nn.Module):
    """A token embedding held in bfloat16 (the LM head's tied matrix); lookups are widened to
    `dtype` (exactly)."""

    weight_format = "bf16"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).to(self.dtype)


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight (`gptfast.ops.quant` layouts) and a bias in the
    activations' dtype: `ops.quantized_linear(x, qweight, scale, zero, bias, ...)`. Buffers
    qweight, scale, zero (None unless "-zp"), bias; attributes bits, group_size, weight_format,
    backend, act_int8 (the native CPU option that quantizes activations per row to int8).
    Inference only (buffers, no gradients)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, weight_format: str, backend: str | None = None,
                 act_int8: bool = False):
        super().__init__()
        if weight_format not in QUANT_FORMATS:
            raise InputError(f"QuantLinear: weight_format must be one of {tuple(QUANT_FORMATS)}, got {weight_format!r}")
        self.bits, self.group_size, _ = QUANT_FORMATS[weight_format]
        self.weight_format = weight_format
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (8 // self.bits)
        self.backend = backend
        self.act_int8 = act_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.qweight, self.scale, self.zero, self.bias, bits=self.bits,
                                    group_size=self.group_size, act_int8=self.act_int8, backend=self.backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these buffers stand for, in `dtype`."""
        return dequantize_weight(self.qweight, self.scale, self.zero, self.bits, self.group_size, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.weight_format}" + (", act_int8" if self.act_int8 else ""))


class QuantEmbedding(nn.Module):
    """A token embedding read from a quantized (vocab, C) matrix: a lookup dequantizes just the
    looked-up rows, in `dtype`. Tied to the LM head (`tied_to=` its QuantLinear), it reads the
    head's own buffers (one packed copy; not registered here, so `.to(device)` moves one copy and
    the state dict holds it once, under lm_head); untied, it holds its own qweight / scale / zero."""

    def __init__(self, qweight: torch.Tensor | None, scale: torch.Tensor | None, zero: torch.Tensor | None,
                 weight_format: str, dtype: torch.dtype, tied_to: QuantLinear | None = None):
        super().__init__()
        self.bits, self.group_size, _ = QUANT_FORMATS[weight_format]
        self.weight_format = weight_format
        self.dtype = dtype
        object.__setattr__(self, "_tied_to", tied_to)  # a plain reference, not a submodule
        if tied_to is None:
            self.register_buffer("qweight", qweight)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        src = self._source()
        self.num_embeddings = src.qweight.shape[0]
        self.embedding_dim = src.qweight.shape[1] * (8 // self.bits)

    def _source(self) -> nn.Module:
        return self if self._tied_to is None else self._tied_to

    @property
    def tied_to(self) -> QuantLinear | None:
        return self._tied_to

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        src = self._source()
        rows = idx.reshape(-1)
        zero = None if src.zero is None else src.zero.index_select(0, rows)
        w = dequantize_weight(src.qweight.index_select(0, rows), src.scale.index_select(0, rows), zero,
                              self.bits, self.group_size, self.dtype)  # (B*T, C)
        return w.view(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        tied = ", tied to the LM head" if self._tied_to is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight_format}{tied}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: its state dict's tensors (parameters and persistent buffers;
    the KV cache is not one), each storage once (a tied head counts once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# Quantize the LM head / tied embedding too (default), measured (gptfast.bench.quant_accuracy,
# README "Quantized weights"): on GPT-2 124M the head is 31 % of the weights and is read every
# decode step; keeping it fp32 makes int8 243 MB instead of 128 MB and int4-g32 206 MB instead
# of 73 MB per token, for a mean KL vs fp32 only ~20 % lower (int8 7.1e-5 vs 8.5e-5, int4-g32
# 7.8e-3 vs 9.4e-3). On the shipped Shakespeare model (65-token head: bytes barely change) the
# quantized head costs int4-g32 +0.43 % perplexity instead of +0.14 %, inside the 3 %.
# head=False is the option for small-vocabulary models where accuracy matters more than bytes.
HEAD_DEFAULT = True


def _check_k(fmt: str, layers: list[tuple[str, nn.Module]]) -> None:
    """Every quantized layer's input width must hold whole groups (and int4 blocks of 32)."""
    bits, group_size, _ = QUANT_FORMATS[fmt]
    need = max(group_size or 1, 32 if bits == 4 else 1)
    bad = [f"{name} ({m.weight.shape[1]})" for name, m in layers if m.weight.shape[1] % need != 0]
    if bad:
        raise InputError(f"quantize: format {fmt!r} needs every quantized layer's input width divisible by "
                         f"{need}; got {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''} (pick another format)")


@torch.no_grad()
def quantize(model: nn.Module, fmt: str, *, head: bool = HEAD_DEFAULT, act_int8: bool = False,
             _empty: bool = False) -> nn.Module:
    """Swap `model`'s linear layers (and its token embedding) for the format `fmt` (one of
    FORMATS), in place; returns the model. The original weights are released (keep a
    `copy.deepcopy` first to compare formats). A model already in `fmt` (with the same `head`)
    is returned unchanged.

    head: also hold the LM head and the token embedding in `fmt` (tied: one copy, read by both;
    untied: each its own); False keeps both in the model's dtype. act_int8: quantized formats,
    native CPU only: quantize activations per row to int8 on the fly (llama.cpp's q8_0 x q8_0
    dot products; other backends ignore it). Sets `model.weight_format` and `model.quantized_head`.
    `_empty` (for checkpoint loading): allocate the formats' buffers uninitialised, skip the math.
    """
    if fmt not in FORMATS:
        raise InputError(f"quantize: fmt must be one of {FORMATS}, got {fmt!r}")
    for name, v in (("head", head), ("act_int8", act_int8)):
        if not isinstance(v, bool):
            raise InputError(f"quantize: {name} must be a bool, got {v!r}")
    if act_int8 and fmt not in QUANT_FORMATS:
        raise InputError(f"quantize: act_int8 is an option of the int8 / int4 formats, got fmt {fmt!r}")
    current = getattr(model, "weight_format", None)
    if current == fmt and getattr(model, "quantized_head", True) == head:
        return model
    if current is not None:
        raise InputError(f"quantize: the model is already in format {current!r}"
                         f"{'' if current != fmt else ' with head=' + str(not head)}; "
                         f"load the original weights to convert to {fmt!r}")
    dtype = model.dtype
    if fmt == "bf16" and dtype != torch.float32:
        raise InputError(f"quantize: 'bf16' weights keep fp32 activations; the model's dtype is {dtype} "
                         "(a bf16 model already holds bf16 weights)")
    tr = model.transformer
    lm_head = getattr(model, "lm_head", None)
    layers = [(f"{pname}.{name}" if pname else name, parent, name, child)
              for pname, parent in model.named_modules() for name, child in parent.named_children()
              if isinstance(child, nn.Linear) and (head or child is not lm_head)]
    if fmt in QUANT_FORMATS:
        _check_k(fmt, [(n, c) for n, _, _, c in layers])
    backend = getattr(model, "backend", None)
    converted: dict[tuple[int, tuple[int, ...]], object] = {}  # one copy per tensor: the head is tied to wte

    def convert(t: torch.Tensor):
        key = (t.data_ptr(), tuple(t.shape))
        if key not in converted:
            if fmt == "bf16":
                converted[key] = t.detach().to(torch.bfloat16)
            elif _empty:
                converted[key] = _empty_quantized(fmt, t)
            else:
                bits, group_size, zp = QUANT_FORMATS[fmt]
                converted[key] = quantize_weight(t.detach(), bits, group_size, zp)
        return converted[key]

    def bias_of(child: nn.Linear) -> torch.Tensor | None:
        return None if child.bias is None else child.bias.detach().clone()

    swaps = []  # built first, swapped after: an error leaves the model as it was
    for _, parent, name, child in layers:
        if fmt == "bf16":
            swaps.append((parent, name, BF16Linear(convert(child.weight), bias_of(child), backend)))
        else:
            q, sc, z = convert(child.weight)
            swaps.append((parent, name, QuantLinear(q, sc, z, bias_of(child), fmt, backend, act_int8)))
    if head:
        if fmt == "bf16":
            swaps.append((tr, "wte", BF16Embedding(convert(tr.wte.weight), dtype)))
        else:
            head_swap = next((m for parent, name, m in swaps if parent is model and name == "lm_head"), None)
            if head_swap is not None and lm_head.weight is tr.wte.weight:  # tied: read the head's copy
                swaps.append((tr, "wte", QuantEmbedding(None, None, None, fmt, dtype, tied_to=head_swap)))
            else:
                q, sc, z = convert(tr.wte.weight)
                swaps.append((tr, "wte", QuantEmbedding(q, sc, z, fmt, dtype)))
    for parent, name, module in swaps:
        setattr(parent, name, module)
    model.weight_format = fmt
    model.quantized_head = head
    return model


def _empty_quantized(fmt: str, w: torch.Tensor):
    """Uninitialised (qweight, scale, zero) of the format's shapes for a weight like `w`."""
    bits, group_size, zp = QUANT_FORMATS[fmt]
    N, K = w.shape
    kw = dict(device=w.device)
    q = torch.empty(N, K * bits // 8, dtype=torch.int8 if bits == 8 else torch.uint8, **kw)
    if group_size is None:
        return q, torch.empty(N, dtype=torch.float32, **kw), None
    scale = torch.empty(N, K // group_size, dtype=torch.float16, **kw)
    return q, scale, (torch.empty_like(scale) if zp else None)
