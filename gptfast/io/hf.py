"""Hugging Face GPT-2: read a directory or a hub name, write a directory transformers loads.

    model = gptfast.io.load_hf_dir("path/to/hf-gpt2-dir")    # config.json + model.safetensors
    save_pretrained(model, "exported")                        # transformers.GPT2LMHeadModel loads it

(`gptfast.io.load` / `GPT.from_pretrained` pick this module for HF directories and hub names.)

Format (`transformers` `GPT2LMHeadModel` / `GPT2Model`): `config.json` plus `model.safetensors`
(or a sharded `model.safetensors.index.json`, or `pytorch_model.bin`). The projections are
`Conv1D` modules whose weight is stored (in, out) -- the transpose of `nn.Linear`'s (out, in) --
so c_attn / c_proj / c_fc weights are transposed on the way in and out. Keys may carry a
`transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, the original `openai-community/gpt2`
upload); old files hold `attn.bias` / `attn.masked_bias` causal-mask buffers, which are dropped.
Mapping follows nanoGPT's `GPT.from_pretrained`
(https://github.com/karpathy/nanoGPT/blob/master/model.py), which also sets dropout to 0.

The MLP's GELU (`GPTConfig.activation`): Hugging Face's `activation_function` maps through
`gptfast.config.HF_ACTIVATIONS` (gelu_new / gelu_pytorch_tanh / gelu_accurate / gelu_fast ->
"gelu_tanh", gelu / gelu_python -> "gelu"; any other function is refused), and `save_pretrained`
writes "gelu_new" or "gelu" back.

Safety: weights come from safetensors or `torch.load(..., weights_only=True)` (gptfast.io._weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gptfast.config import HF_ACTIVATION_NAMES, GPTConfig, activation_from_hf
from gptfast.errors import CheckpointError
from gptfast.io._weights import build_model, load_safetensors, torch_load_weights_only
from gptfast.io.atomic import write_file_atomic, write_in_own_dir
from gptfast.model import GPT, LayerNorm

# Hub names accepted for download, with the repository that holds them today.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
GPT2_VOCAB = 50257
# Conv1D modules of HF GPT-2: weight stored (in, out), transposed relative to nn.Linear.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ----------------------------------------------------------------------------- Hugging Face GPT-2


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 `config.json` dict; refuses what our model can't honour."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what}; gptfast implements plain GPT-2 only")

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise bad(f"model_type is {model_type!r}, expected 'gpt2'")
    try:  # GELU with the tanh approximation (GPT-2) or exact (erf): see gptfast.config.HF_ACTIVATIONS
        activation = activation_from_hf(hf.get("activation_function", "gelu_new"))
    except ValueError as e:
        raise bad(str(e)) from None
    # Options of transformers' GPT2Attention that change the math of the attention.
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise bad("scale_attn_by_inverse_layer_idx=True (Mistral/CRFM-style layer-wise scaling)")
    if hf.get("reorder_and_upcast_attn", False):
        raise bad("reorder_and_upcast_attn=True")
    if not hf.get("scale_attn_weights", True):
        raise bad("scale_attn_weights=False (unscaled attention scores)")
    if hf.get("add_cross_attention", False):
        raise bad("add_cross_attention=True (an encoder-decoder cross-attention model)")
    try:
        n_embd = hf["n_embd"]
        kwargs = dict(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=n_embd,
            n_inner=hf.get("n_inner") or 4 * n_embd,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            dropout=0.0,  # inference default, as nanoGPT's from_pretrained
            bias=True,
            activation=activation,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing GPT-2 field {e.args[0]!r}") from None
    try:
        return GPTConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The `config.json` dict `transformers.GPT2LMHeadModel` needs to rebuild `config` exactly."""
    gpt2_vocab = config.vocab_size >= GPT2_VOCAB
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": HF_ACTIVATION_NAMES[config.activation],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None if config.n_inner == 4 * config.n_embd else config.n_inner,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(config.tie_weights),
        "use_cache": True,
        # <|endoftext|> of the GPT-2 vocabulary; no special tokens in other vocabularies.
        "bos_token_id": 50256 if gpt2_vocab else None,
        "eos_token_id": 50256 if gpt2_vocab else None,
    }


def _hf_state_to_gptfast(state: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 keys/layouts -> our keys/layouts (Conv1D weights transposed to (out, in))."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() != 1:
            continue  # causal-mask buffers of old transformers versions, not weights
        if key == "lm_head.weight":
            out[key] = t
            continue
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(_CONV1D_SUFFIXES):
            if t.dim() != 2:
                raise CheckpointError(f"{source}: {key} must be 2-D, got shape {tuple(t.shape)}")
            t = t.t()
        out["transformer." + name] = t
    wte = out.get("transformer.wte.weight")
    if config.tie_weights:
        if wte is None:
            raise CheckpointError(f"{source}: missing the token embedding wte.weight")
        out["lm_head.weight"] = wte  # tied: HF usually omits the head, or stores a duplicate
    elif "lm_head.weight" not in out:
        raise CheckpointError(f"{source}: tie_word_embeddings is false but lm_head.weight is missing")
    return out


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    binfile = d / "pytorch_model.bin"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(d / shard))
        return state
    if binfile.is_file():
        state = torch_load_weights_only(binfile)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{binfile}: expected a state dict of tensors")
        return state
    raise CheckpointError(
        f"{d}: no weights found (expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin next to config.json)"
    )


def load_hf_dir(path: str | os.PathLike) -> GPT:
    """A GPT from a local Hugging Face GPT-2 directory (config.json + weights)."""
    d = Path(path)
    cfg_path = d / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path} ({e})") from None
    config = config_from_hf(hf, source=str(cfg_path))
    state = _hf_state_to_gptfast(_read_hf_weights(d), config, str(d))
    return build_model(config, state, str(d))


# ----------------------------------------------------------------------------- hub names


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_name(name: str) -> bool:
    # Only the known names: an arbitrary "a/b" is far more often a mistyped local path, which must
    # give "not found" rather than a network request.
    return name in HUB_MODELS or name in HUB_MODELS.values()


def download_hub_model(name: str) -> Path:
    """Local directory of hub model `name` (a key or a repo id of HUB_MODELS) holding
    config.json + model.safetensors: the local Hugging Face cache first, the network only when
    not offline (`HF_HUB_OFFLINE=1` forbids it)."""
    repo = HUB_MODELS.get(name, name)
    how = (f"download config.json and model.safetensors from https://huggingface.co/{repo} "
           f"into a directory and pass that directory's path instead of {name!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"cannot fetch {name!r}: huggingface_hub is not installed; {how}") from None
    patterns = ["config.json", "model.safetensors"]
    try:  # already in the local cache: no network at all
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (not cached, no such repo) -> try the network
        pass
    if _hub_offline():
        raise CheckpointError(f"cannot fetch {name!r}: offline (HF_HUB_OFFLINE=1) and not in the "
                              f"Hugging Face cache; {how}")
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network down, repo missing, auth: all one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot fetch {name!r} from the Hugging Face hub ({reason}); {how}") from None


def save_pretrained(model: GPT, directory: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
    `transformers.GPT2LMHeadModel.from_pretrained(directory)` loads with identical logits.

    Weights are written in the model's dtype, Conv1D ones transposed to (in, out); a model without
    biases (`bias=False`) gets explicit zero biases, which computes the same function.

    Only model.safetensors and config.json are written (anything else in the directory, e.g. a
    tokenizer or a README, is left alone; the directory is never renamed): each goes to a
    temporary file beside it, fsynced and renamed over the old one, weights first, config last.
    """
    from safetensors.torch import save_file

    if not isinstance(model, GPT):
        raise TypeError(f"save_pretrained: model must be a gptfast GPT, got {type(model).__name__}")
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            if not config.tie_weights:
                state[key] = t.detach().cpu().contiguous()
            continue  # tied: transformers re-ties it to wte on load
        t = t.detach().cpu()
        if key.endswith(_CONV1D_SUFFIXES):
            t = t.t()
        state[key] = t.contiguous()
    # Zero biases where our config has none (bias=False): GPT2LMHeadModel always has them, and a
    # zero bias computes the same function. (out, in) Linear weights and (n,) LayerNorm weights
    # both start with the bias length.
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, LayerNorm)) and module.bias is None and name != "lm_head":
            w = module.weight
            state[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)

    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"save_pretrained: {d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(config)
    hf_config["dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    write_file_atomic(  # save_file's own temporary stays in a directory of ours (atomic.write_in_own_dir)
        d / "model.safetensors",
        lambda p: write_in_own_dir(p, lambda q: save_file(state, str(q), metadata={"format": "pt"})),
    )
    write_file_atomic(d / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    return d


__all__ = [
    "HUB_MODELS",
    "config_from_hf",
    "config_to_hf",
    "download_hub_model",
    "is_hub_name",
    "load_hf_dir",
    "save_pretrained",
]
