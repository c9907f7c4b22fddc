"""nanoGPT checkpoints (`ckpt.pt` written by karpathy/nanoGPT's train.py).

Format: `{"model": state_dict, "model_args": {...}, "optimizer": ..., "iter_num", "best_val_loss",
"config"}` with our module names and `nn.Linear` layout; a model trained with `torch.compile` has
every key prefixed `_orig_mod.`, which is stripped. nanoGPT's MLP is `nn.GELU()`, the exact erf
GELU, so nanoGPT checkpoints load as activation "gelu".

nanoGPT pads the GPT-2 vocabulary 50257 -> 50304 (a multiple of 64, for matmul speed). The 47
padding rows are never a target and never an input, so their logits are meaningless (training only
pushes them down) and the GPT-2 tokenizer cannot decode their ids. We therefore **slice the
vocabulary back to 50257 by default** (`trim_vocab=True`): the 50257 real logits are bit-identical
to the padded model's first 50257, sampling can never emit an undecodable id, and the softmax is
normalised over real tokens only. `trim_vocab=False` keeps all 50304 rows, as nanoGPT's own
sample.py does.

Safety: the file is read with `torch.load(..., weights_only=True)` (gptfast.io._weights); a pickle
that asks for any other object (e.g. one whose `__reduce__` runs code) is refused with a
`CheckpointError`. nanoGPT's `meta.pkl` (the character vocabulary of its char-level runs) is a
pickle too and is never read: pass a tokenizer instead.
"""

from __future__ import annotations

from typing import Any

from gptfast.config import GPTConfig
from gptfast.errors import CheckpointError
from gptfast.io._weights import build_model
from gptfast.model import GPT
from gptfast.tokenizers import GPT2_VOCAB_SIZE

NANOGPT_PADDED_VOCAB = 50304


def is_nanogpt(obj: Any) -> bool:
    return isinstance(obj, dict) and "model_args" in obj and "model" in obj


def config_from_nanogpt(model_args: dict[str, Any], source: str) -> GPTConfig:
    """GPTConfig from nanoGPT's `model_args` (n_layer, n_head, n_embd, block_size, bias,
    vocab_size, dropout)."""
    try:
        return GPTConfig(
            n_layer=model_args["n_layer"], n_head=model_args["n_head"], n_embd=model_args["n_embd"],
            block_size=model_args["block_size"], vocab_size=model_args["vocab_size"],
            bias=bool(model_args.get("bias", True)), dropout=0.0, tie_weights=True,
            activation="gelu",  # nanoGPT's MLP has always been nn.GELU(): the exact erf GELU
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: model_args lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: model_args: {e}") from None


def load_nanogpt(ckpt: dict[str, Any], source: str, *, trim_vocab: bool = True) -> GPT:
    """A GPT from a loaded nanoGPT checkpoint dict (see the module docstring on `trim_vocab`)."""
    if not isinstance(ckpt.get("model_args"), dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{source}: 'model_args' and 'model' must be dicts")
    config = config_from_nanogpt(ckpt["model_args"], source)
    prefix = "_orig_mod."  # torch.compile wraps the module; nanoGPT strips this in sample.py too
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in ckpt["model"].items()}
    # nanoGPT before flash attention registered the causal mask as the buffer `attn.bias`
    # of shape (1, 1, block, block); not a weight.
    state = {k: v for k, v in state.items() if not (k.endswith(".attn.bias") and v.dim() == 4)}
    if config.tie_weights and "transformer.wte.weight" in state:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model = build_model(config, state, source)
    if trim_vocab and config.vocab_size == NANOGPT_PADDED_VOCAB:
        model = _trim_vocab(model, GPT2_VOCAB_SIZE)
    return model


def _trim_vocab(model: GPT, vocab_size: int) -> GPT:
    """Keep the first `vocab_size` rows of the (tied) embedding / head: the logits of those ids
    are unchanged, the padding ids disappear."""
    cfg = GPTConfig.from_dict({**model.config.to_dict(), "vocab_size": vocab_size})
    state = dict(model.state_dict())
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:vocab_size]
    state["lm_head.weight"] = state["lm_head.weight"][:vocab_size]
    return build_model(cfg, state, "trim_vocab")


__all__ = ["NANOGPT_PADDED_VOCAB", "config_from_nanogpt", "is_nanogpt", "load_nanogpt"]
