"""Model configuration: the `GPTConfig` dataclass and a table of named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from gptfast.errors import InputError

# MLP activations: "gelu_tanh" = GELU with the tanh approximation (GPT-2, Hugging Face "gelu_new");
# "gelu" = the exact GELU x * Phi(x) with the erf (torch.nn.GELU(), nanoGPT, Hugging Face "gelu").
ACTIVATIONS = ("gelu_tanh", "gelu")

# Hugging Face `activation_function` -> ours, for exactly the functions that are one of ours
# (transformers/activations.py, ACT2CLS): gelu_new (NewGELUActivation), gelu_pytorch_tanh
# (F.gelu(approximate="tanh")) and gelu_accurate (AccurateGELUActivation) are the tanh formula
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); gelu_fast (FastGELUActivation) is the same
# formula with sqrt(2/pi) written to 10 digits, 4e-12 relative away (far below fp32 rounding);
# gelu (F.gelu) and gelu_python (x/2 (1 + erf(x/sqrt 2))) are the exact GELU. Everything else
# (relu, silu, quick_gelu = x sigmoid(1.702 x), gelu_10 (clipped), ...) is a different function.
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
}
# What `save_pretrained` writes for each of ours.
HF_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def activation_from_hf(name: Any) -> str:
    """Our activation for a Hugging Face `activation_function`; ValueError for any other function."""
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise InputError(
            f"activation_function is {name!r}, expected one of {sorted(HF_ACTIVATIONS)} (GELU: "
            "gelu_new / gelu_pytorch_tanh / gelu_accurate / gelu_fast = tanh approximation, "
            "gelu / gelu_python = exact erf)"
        )
    return HF_ACTIVATIONS[name]


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT-2-architecture model.

    Defaults are GPT-2 124M. Derived fields (`head_dim`, `n_inner`) are computed in `__post_init__`.
    """

    block_size: int = 1024  # maximum sequence length (learned position embeddings)
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True)
    qkv_bias: bool | None = None  # bias of the fused q/k/v projection; None = same as `bias`
    tie_weights: bool = True  # LM head shares the token embedding matrix (GPT-2: True)
    layer_norm_eps: float = 1e-5
    n_inner: int | None = None  # MLP hidden width; None = 4 * n_embd
    activation: str = "gelu_tanh"  # MLP activation, one of ACTIVATIONS (GPT-2: gelu_tanh)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise InputError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise InputError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"GPTConfig.activation must be one of {ACTIVATIONS} (gelu_tanh: GPT-2's tanh "
                f"approximation; gelu: the exact erf GELU), got {self.activation!r}"
            )
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        self.head_dim = self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Build a config from a preset name (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Inverse of `to_dict`; unknown keys raise `ValueError` (a typo must not pass silently)."""
        init_names = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - init_names - {"head_dim"})
        if unknown:
            raise InputError(f"GPTConfig: unknown field(s) {unknown}; known: {sorted(init_names)}")
        return cls(**{k: v for k, v in d.items() if k in init_names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("head_dim")
        return d


# name -> GPTConfig fields. GPT-2 sizes from Radford et al. 2019 (Table 2) / the released checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Character-level Tiny Shakespeare model (vocab 65); trained and shipped with the package.
    # 4 layers x 192 wide (6 heads of 32): sized to train to val loss < 1.75 in ~30 min on 2 CPU cores.
    "shakespeare-char": dict(
        n_layer=4, n_head=6, n_embd=192, block_size=128, vocab_size=65, dropout=0.1
    ),
    # Small and fast, for tests and smoke runs.
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=65),
}
