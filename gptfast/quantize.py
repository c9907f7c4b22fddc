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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptfast import ops
from gptfast.errors import InputError

FORMATS = ("bf16",)


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


@torch.no_grad()
def quantize(model: nn.Module, fmt: str) -> nn.Module:
    """Swap `model`'s linear layers (and its tied token embedding) for the format `fmt` (one of
    FORMATS), in place; returns the model. The original weights are released (keep a
    `copy.deepcopy` first to compare formats). A model already in `fmt` is returned unchanged."""
    if fmt not in FORMATS:
        raise InputError(f"quantize: fmt must be one of {FORMATS}, got {fmt!r}")
    if getattr(model, "weight_format", None) == fmt:
        return model
    if getattr(model, "weight_format", None) is not None:
        raise InputError(f"quantize: the model is already in format {model.weight_format!r}; "
                         f"load the original weights to convert to {fmt!r}")
    dtype = model.dtype
    if dtype != torch.float32:
        raise InputError(f"quantize: 'bf16' weights keep fp32 activations; the model's dtype is {dtype} "
                         "(a bf16 model already holds bf16 weights)")
    converted: dict[int, torch.Tensor] = {}  # one copy per tensor: the LM head is tied to wte

    def bf16(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in converted:
            converted[t.data_ptr()] = t.detach().to(torch.bfloat16)
        return converted[t.data_ptr()]

    backend = getattr(model, "backend", None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.detach().clone()
                setattr(parent, name, BF16Linear(bf16(child.weight), bias, backend))
    tr = model.transformer
    tr.wte = BF16Embedding(bf16(tr.wte.weight), dtype)  # the same copy as the LM head's when tied
    model.weight_format = fmt
    return model
