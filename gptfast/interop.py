"""Interoperability: load Hugging Face GPT-2, nanoGPT and gptfast checkpoints; write HF GPT-2.

    model = GPT.from_pretrained("path/to/hf-gpt2-dir")     # config.json + model.safetensors
    model = GPT.from_pretrained("gpt2")                    # hub name: cached or downloaded
    model = GPT.from_pretrained("out/ckpt.pt")             # nanoGPT checkpoint
    model.save_pretrained("exported")                      # transformers.GPT2LMHeadModel loads it
    model, tokenizer = load_any(path)                      # any of the above + its tokenizer

Formats (the architecture is the same in all three, only names and layouts differ):

* Hugging Face GPT-2 (`transformers` `GPT2LMHeadModel` / `GPT2Model`): `config.json` plus
  `model.safetensors` (or a sharded `model.safetensors.index.json`, or `pytorch_model.bin`).
  The projections are `Conv1D` modules whose weight is stored (in, out) -- the transpose of
  `nn.Linear`'s (out, in) -- so c_attn / c_proj / c_fc weights are transposed on the way in and out.
  Keys may carry a `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, the original
  `openai-community/gpt2` upload); old files hold `attn.bias` / `attn.masked_bias` causal-mask
  buffers, which are dropped. Mapping follows nanoGPT's `GPT.from_pretrained`
  (https://github.com/karpathy/nanoGPT/blob/master/model.py), which also sets dropout to 0.
* nanoGPT `ckpt.pt` (train.py): `{"model": state_dict, "model_args": {...}, "optimizer": ...,
  "iter_num", "best_val_loss", "config"}` with our module names and `nn.Linear` layout; a model
  trained with `torch.compile` has every key prefixed `_orig_mod.`, which is stripped.
* gptfast checkpoints (`gptfast.checkpoint`): a directory with `gptfast.json`.

The MLP's GELU (`GPTConfig.activation`) follows each format: nanoGPT's MLP is `nn.GELU()`, the
exact erf GELU, so nanoGPT checkpoints load as "gelu"; Hugging Face's `activation_function` maps
through `gptfast.config.HF_ACTIVATIONS` (gelu_new / gelu_pytorch_tanh / gelu_accurate / gelu_fast
-> "gelu_tanh", gelu / gelu_python -> "gelu"; any other function is refused), and
`save_pretrained` writes "gelu_new" or "gelu" back.

nanoGPT pads the GPT-2 vocabulary 50257 -> 50304 (a multiple of 64, for matmul speed). The 47
padding rows are never a target and never an input, so their logits are meaningless (training only
pushes them down) and the GPT-2 tokenizer cannot decode their ids. We therefore **slice the
vocabulary back to 50257 by default** (`trim_vocab=True`): the 50257 real logits are bit-identical
to the padded model's first 50257, sampling can never emit an undecodable id, and the softmax is
normalised over real tokens only. `trim_vocab=False` keeps all 50304 rows, as nanoGPT's own
sample.py does.

Safety: nothing is unpickled beyond tensors and plain containers. Weights come from safetensors or
`torch.load(..., weights_only=True)`; a pickle that asks for any other object (e.g. one whose
`__reduce__` runs code) is refused with a `CheckpointError`. nanoGPT's `meta.pkl` (the character
vocabulary of its char-level runs) is a pickle too and is never read: pass a tokenizer instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# CheckpointError (a ValueError): one class for every unreadable / unsafe / unsupported checkpoint.
from gptfast.checkpoint import META_NAME, CheckpointError, load_checkpoint
from gptfast.config import HF_ACTIVATION_NAMES, GPTConfig, activation_from_hf
from gptfast.errors import InputError, MissingFileError
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
NANOGPT_PADDED_VOCAB = 50304
# Conv1D modules of HF GPT-2: weight stored (in, out), transposed relative to nn.Linear.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ----------------------------------------------------------------------------- safe file reading


def _torch_load_weights_only(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, dicts, lists, tuples, str/int/float/bool/None
    only. Anything else (a class instance, a callable, `__reduce__` tricks) is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that asks for objects other than tensors and "
            f"plain containers, and gptfast never unpickles arbitrary objects (they can run code). "
            f"Re-save it as tensors only (e.g. safetensors). [{first}]"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # a damaged or foreign file: the weights-only unpickler fails in many ways (KeyError: 105 ...)
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path} ({e})") from None


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
        return _load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(d / shard))
        return state
    if binfile.is_file():
        state = _torch_load_weights_only(binfile)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{binfile}: expected a state dict of tensors")
        return state
    raise CheckpointError(
        f"{d}: no weights found (expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin next to config.json)"
    )


def _build(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding exactly `state` (fp32), checked key by key against the config."""
    # Sizes within bounds and agreeing with the tensors, before a single module is built
    # (n_layer 100000 beside a tiny file used to take minutes to refuse).
    from gptfast.checkpoint import check_config_dict, check_weights_fit_config

    check_config_dict(config.to_dict(), source)
    check_weights_fit_config({k: tuple(v.shape) for k, v in state.items()}, config, source)
    # Build on the meta device: no time spent on a random init that is overwritten at once.
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''})"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
            )
    fp32 = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if config.tie_weights:
        fp32["lm_head.weight"] = fp32["transformer.wte.weight"]
    model.load_state_dict(fp32, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters
    return model.eval()


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
    return _build(config, state, str(d))


# ----------------------------------------------------------------------------- hub names


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_hub_name(name: str) -> bool:
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


# ----------------------------------------------------------------------------- nanoGPT


def _is_nanogpt(obj: Any) -> bool:
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
    model = _build(config, state, source)
    if trim_vocab and config.vocab_size == NANOGPT_PADDED_VOCAB:
        model = _trim_vocab(model, GPT2_VOCAB)
    return model


def _trim_vocab(model: GPT, vocab_size: int) -> GPT:
    """Keep the first `vocab_size` rows of the (tied) embedding / head: the logits of those ids
    are unchanged, the padding ids disappear."""
    cfg = GPTConfig.from_dict({**model.config.to_dict(), "vocab_size": vocab_size})
    state = dict(model.state_dict())
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:vocab_size]
    state["lm_head.weight"] = state["lm_head.weight"][:vocab_size]
    return _build(cfg, state, "trim_vocab")


# ----------------------------------------------------------------------------- entry points


def _kind(path: Path) -> str:
    """'gptfast' | 'hf' | 'torch' (a pickle file: nanoGPT or HF .bin) for an existing path."""
    d = path if path.is_dir() else path.parent
    if (d / META_NAME).is_file() and (path.is_dir() or path.suffix == ".safetensors"):
        return "gptfast"
    if path.is_dir():
        if (d / "config.json").is_file():
            return "hf"
        raise CheckpointError(
            f"{path}: not a checkpoint directory (no gptfast.json, no Hugging Face config.json)"
        )
    if path.name == "config.json" or (path.suffix == ".safetensors" and (d / "config.json").is_file()):
        return "hf"
    if path.name == "pytorch_model.bin" and (d / "config.json").is_file():
        return "hf"
    return "torch"


def _load(path_or_name: str | os.PathLike, trim_vocab: bool) -> tuple[GPT, Any, str]:
    """(model, gptfast tokenizer or None, format name)."""
    p = Path(path_or_name)
    if not p.exists():
        name = str(path_or_name)
        if _is_hub_name(name):
            return load_hf_dir(download_hub_model(name)), None, "hf"
        raise MissingFileError(
            f"checkpoint not found: {name!r} is neither an existing path nor a hub name "
            f"({', '.join(HUB_MODELS)})"
        )
    kind = _kind(p)
    if kind == "gptfast":
        model, tokenizer, _ = load_checkpoint(p)
        return model, tokenizer, "gptfast"
    if kind == "hf":
        return load_hf_dir(p if p.is_dir() else p.parent), None, "hf"
    with open(p, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save zip / pickle
        raise CheckpointError(
            f"{p}: not a checkpoint gptfast knows (neither a torch.save file nor safetensors): expected "
            "a gptfast checkpoint directory, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt"
        )
    obj = _torch_load_weights_only(p)
    if _is_nanogpt(obj):
        return load_nanogpt(obj, str(p), trim_vocab=trim_vocab), None, "nanogpt"
    raise CheckpointError(
        f"{p}: not a checkpoint gptfast knows: expected a nanoGPT ckpt.pt (a dict with 'model' and "
        "'model_args'), a Hugging Face GPT-2 directory or a gptfast checkpoint directory"
    )


def from_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    *,
    trim_vocab: bool = True,
) -> GPT:
    """A `GPT` in eval mode (fp32) from any supported checkpoint.

    Args:
        path_or_name: a Hugging Face GPT-2 directory (or its config.json / weights file), a hub
            name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or their hub repo ids such as
            "openai-community/gpt2"), a nanoGPT
            ckpt.pt, or a gptfast checkpoint directory.
        device: where the model goes.
        backend: op backend of the model (None = the global choice; see `gptfast.ops`).
        trim_vocab: slice a nanoGPT-padded 50304 vocabulary back to GPT-2's 50257.
    Raises `FileNotFoundError` (no such path / name), `CheckpointError` (a ValueError: unreadable,
    unsafe, or a config we cannot honour).
    """
    model, _, _ = _load(path_or_name, trim_vocab)
    model.to(device)
    model.backend = backend
    return model


def load_any(
    path_or_name: str | os.PathLike,
    tokenizer: Any = None,
    *,
    device: str | torch.device = "cpu",
    trim_vocab: bool = True,
) -> tuple[GPT, Any]:
    """(model, tokenizer) from any supported checkpoint (see `from_pretrained`).

    The tokenizer: a gptfast checkpoint's own; for Hugging Face / nanoGPT checkpoints with the
    GPT-2 vocabulary (50257, or nanoGPT's padded 50304) `GPT2Tokenizer`. Other vocabularies (e.g.
    nanoGPT's character-level runs, whose vocabulary sits in a pickle `meta.pkl` that gptfast
    will not unpickle) need `tokenizer=` (e.g. `CharTokenizer(chars)`); an explicit `tokenizer`
    always wins and must cover the model's vocabulary.
    """
    model, own, kind = _load(path_or_name, trim_vocab)
    model.to(device)
    V = model.config.vocab_size
    if tokenizer is None:
        tokenizer = own
    if tokenizer is None:
        if V in (GPT2_VOCAB, NANOGPT_PADDED_VOCAB):
            from gptfast.tokenizers import GPT2Tokenizer

            tokenizer = GPT2Tokenizer()
        else:
            where = ("nanoGPT keeps a char-level run's vocabulary in a pickle (data/<dataset>/meta.pkl), "
                     "which gptfast does not unpickle (pickles can run code); "
                     if kind == "nanogpt" else "")
            raise CheckpointError(
                f"{path_or_name}: no tokenizer for a vocabulary of {V} tokens (not GPT-2's {GPT2_VOCAB}); "
                f"{where}pass one: load_any(path, tokenizer=gptfast.CharTokenizer(chars)), then "
                "gptfast.checkpoint.save_checkpoint(dir, model, tokenizer) converts it to a gptfast "
                "checkpoint that `gptfast generate --checkpoint dir` reads"
            )
    if tokenizer.vocab_size > V:
        raise InputError(
            f"load_any: tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {V}"
        )
    return model, tokenizer


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

    from gptfast.checkpoint import write_file_atomic

    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"save_pretrained: {d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(config)
    hf_config["dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    write_file_atomic(d / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_file_atomic(d / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    return d


__all__ = [
    "HUB_MODELS",
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "download_hub_model",
    "from_pretrained",
    "load_any",
    "load_hf_dir",
    "load_nanogpt",
    "save_pretrained",
]
