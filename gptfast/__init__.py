"""gptfast: a GPT-2-architecture model whose hot paths run on fused kernels.

    from gptfast import GPT, GPTConfig, CharTokenizer, GPT2Tokenizer, ops
    model = GPT(GPTConfig.from_preset("gpt2"), backend="auto")

Threads: the `gptfast` command fits torch's thread count to the cores other processes leave free
(gptfast.threads); a library user keeps torch's own setting.
"""

from gptfast import ops
from gptfast.config import PRESETS, GPTConfig
from gptfast.generation import generate, stream
from gptfast.quantize import quantize
from gptfast.model import GPT, BigramLanguageModel
from gptfast.ops import set_backend, use_backend
from gptfast.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_dict,
)

__version__ = "0.1.0"


def patch(model, backend=None):
    """Run a transformers GPT-2 model's attention, LayerNorm and MLP on gptfast ops, in place
    (see `gptfast.hf_patch`; transformers is imported only here)."""
    from gptfast.hf_patch import patch as _patch

    return _patch(model, backend=backend)


def unpatch(model):
    """Undo `gptfast.patch(model)`."""
    from gptfast.hf_patch import unpatch as _unpatch

    return _unpatch(model)


__all__ = [
    "GPT",
    "PRESETS",
    "BigramLanguageModel",
    "CharTokenizer",
    "GPT2Tokenizer",
    "GPTConfig",
    "Tokenizer",
    "generate",
    "get_tokenizer",
    "ops",
    "quantize",
    "patch",
    "set_backend",
    "stream",
    "tokenizer_from_dict",
    "unpatch",
    "use_backend",
]
