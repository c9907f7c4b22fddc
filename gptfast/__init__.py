"""gptfast: a GPT-2-architecture model whose hot paths run on fused kernels.

    from gptfast import GPT, GPTConfig, CharTokenizer, GPT2Tokenizer, ops
    model = GPT(GPTConfig.from_preset("gpt2"), backend="auto")
"""

from gptfast import ops
from gptfast.config import PRESETS, GPTConfig
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

__all__ = [
    "GPT",
    "PRESETS",
    "BigramLanguageModel",
    "CharTokenizer",
    "GPT2Tokenizer",
    "GPTConfig",
    "Tokenizer",
    "get_tokenizer",
    "ops",
    "set_backend",
    "tokenizer_from_dict",
    "use_backend",
]
