"""Drop-in acceleration of an existing Hugging Face `transformers` GPT-2 model.

    model = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
    gptfast.patch(model)            # attention, LayerNorm and MLP now run on gptfast ops
    model.generate(...)             # same API, same weights, same outputs
    gptfast.unpatch(model)          # the original forwards are back

The idea is Liger-Kernel's `apply_liger_kernel_to_*(model=...)`
(https://github.com/linkedin/Liger-Kernel, `src/liger_kernel/transformers/monkey_patch.py`,
`_bind_method_to_module`): patch at the *instance* level by binding a new `forward` into each
module's `__dict__`, so the class (and every other model in the process) is untouched and
`unpatch` only has to drop the instance attribute. The patched forwards read the module's own
parameters on every call: no weight is copied, so training, `load_state_dict`, `save_pretrained`
and tied embeddings keep working.

What runs where:
* every `nn.LayerNorm` of the GPT-2 stack -> `ops.layer_norm` (position-wise: always exact);
* every `GPT2MLP` -> `ops.gelu_mlp` with the Conv1D weights passed as transposed *views*
  (Conv1D stores (in, out), the op takes nn.Linear's (out, in)) and the model's GELU: the tanh
  GELUs (`gelu_new`, `gelu_pytorch_tanh`, ...) as "gelu_tanh", `gelu` / `gelu_python` as the exact
  "gelu" (see `gptfast.config.HF_ACTIVATIONS`) -- other activations keep the original MLP, with a warning;
* `GPT2Attention` (self-attention) -> `ops.causal_attention`, but only for the plain causal T x T
  case: no padding in the mask, nothing already in the KV cache (a prefill fills an empty
  DynamicCache exactly as the original does), eager or sdpa attention, attention weights not
  requested. Anything else -- a left-padded batch, a decode step against a filled cache, a static
  or quantized cache, cross-attention, `output_attentions`, flash/flex kernels, extra attention
  kwargs -- calls the original forward for that call, so `generate()` (greedy, sampling, padded
  batches) gives the same output as the unpatched model. The LM head and the `labels=` loss are
  not touched.

Version guard: the patch mirrors transformers 5's GPT2Attention; tested with 5.23 and 5.24
(`SUPPORTED_TRANSFORMERS`). 5.24 renamed the attention's cache argument from `past_key_values` to
`cache`: the patch reads the name from the signature and maps it (`_CACHE_ARGS`). Another major
version, or a GPT2Attention.forward whose signature differs in any other way, raises
`RuntimeError` at `patch()` time instead of risking a silently wrong answer.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from types import MethodType
from typing import Any

import torch
import torch.nn as nn

from gptfast import ops
from gptfast.config import HF_ACTIVATIONS

SUPPORTED_TRANSFORMERS = ("5.23", "5.24")  # the releases the test suite runs against (see setup.py)
TESTED_TRANSFORMERS = " and ".join(SUPPORTED_TRANSFORMERS)
_SUPPORTED_MAJOR = 5
# GPT2Attention.forward's parameters in transformers 5 (the ones our forward re-implements); the
# third is the KV cache, whose name changed: "past_key_values" up to 5.23, "cache" from 5.24.
_CACHE_ARGS = ("past_key_values", "cache")
_ATTN_PARAMS = (
    "self", "hidden_states", "<cache>", "attention_mask", "encoder_hidden_states",
    "encoder_attention_mask", "output_attentions", "kwargs",
)


def _cache_arg_name(params: tuple[str, ...]) -> str | None:
    """The name of GPT2Attention.forward's cache parameter, or None if `params` is not a signature
    this patch understands (same parameters in the same order, the cache under a known name)."""
    if len(params) != len(_ATTN_PARAMS) or params[2] not in _CACHE_ARGS:
        return None
    if any(p != want for i, (p, want) in enumerate(zip(params, _ATTN_PARAMS)) if i != 2):
        return None
    return params[2]
_MLP_PARAMS = ("self", "hidden_states")
_FAST_ATTN_IMPLS = ("eager", "sdpa")
# Extra keyword arguments the GPT-2 stack passes to its attention that do not change the math of
# eager / sdpa self-attention. Any other key (position_bias, softcap, a paged cache, ...) -> original.
_HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "cache_position"})

_PATCH_ATTR = "_gptfast_patch"  # on each patched module: {"kind", "saved_forward", "backend"}


# ----------------------------------------------------------------------------- version guard


def _gpt2_module():
    """(transformers' modeling_gpt2, the attention's cache argument name), after checking it is a
    version this patch was written for."""
    try:
        import transformers
        from transformers.models.gpt2 import modeling_gpt2
    except ImportError as e:
        raise ImportError(
            f"gptfast.patch needs transformers {_SUPPORTED_MAJOR}.x (pip install 'transformers>={_SUPPORTED_MAJOR},"
            f"<{_SUPPORTED_MAJOR + 1}'): {e}"
        ) from None
    version = getattr(transformers, "__version__", "?")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major != _SUPPORTED_MAJOR:
        raise RuntimeError(
            f"gptfast.patch supports transformers {_SUPPORTED_MAJOR}.x (tested with {TESTED_TRANSFORMERS}), "
            f"got {version}: its GPT-2 internals differ, so patching could give wrong answers"
        )
    got = tuple(inspect.signature(modeling_gpt2.GPT2Attention.forward).parameters)
    cache_arg = _cache_arg_name(got)
    if cache_arg is None:
        want = tuple(" | ".join(_CACHE_ARGS) if p == "<cache>" else p for p in _ATTN_PARAMS)
        raise RuntimeError(
            f"gptfast.patch: transformers {version} GPT2Attention.forward takes {got}, but the patch "
            f"was written for {want} (transformers {TESTED_TRANSFORMERS}); refusing to patch"
        )
    got = tuple(inspect.signature(modeling_gpt2.GPT2MLP.forward).parameters)
    if got != _MLP_PARAMS:
        raise RuntimeError(
            f"gptfast.patch: transformers {version} GPT2MLP.forward takes {got}, expected {_MLP_PARAMS}"
        )
    return modeling_gpt2, cache_arg


def _recording_attentions() -> bool:
    """True while transformers' output capture wants attention weights (output_attentions=True):
    only the original forward produces them."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - guarded by the version check; be safe anyway
        return True
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


# ----------------------------------------------------------------------------- causal-mask check


class _MaskMemo:
    """Remembers the verdict for the last mask tensor seen: all layers of one forward receive the
    same mask object, so it is inspected once per forward, not once per layer."""

    def __init__(self) -> None:
        self._last: tuple[Any, int, bool] | None = None  # (weakref to the mask, its _version, verdict)

    def is_plain_causal(self, mask: torch.Tensor | None, T: int) -> bool:
        """True if `mask` means exactly "causal, no padding" for T queries over T keys."""
        if mask is None:  # sdpa without padding: transformers drops the mask and relies on is_causal
            return True
        if mask.dim() != 4 or mask.shape[-2] != T or mask.shape[-1] != T:
            return False
        last = self._last
        if last is not None and last[0]() is mask and last[1] == mask._version:
            return last[2]
        tril = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()  # (T, T) allowed
        if mask.dtype == torch.bool:  # sdpa with padding: True = attend
            ok = bool((mask == tril).all())
        elif mask.is_floating_point():  # eager: additive, 0 = attend, dtype min = blocked
            allowed = mask == 0
            blocked = mask <= torch.finfo(mask.dtype).min / 2
            ok = bool((allowed == tril).all()) and bool((allowed | blocked).all())
        else:
            ok = False
        self._last = (weakref.ref(mask), mask._version, ok)
        return ok


# ----------------------------------------------------------------------------- patched forwards


def _backend(module: nn.Module) -> str | None:
    return getattr(module, _PATCH_ATTR)["backend"]


def _original(module: nn.Module):
    """The forward that was in force before patching (an instance override, or the class's)."""
    saved = getattr(module, _PATCH_ATTR)["saved_forward"]
    return saved if saved is not None else MethodType(type(module).forward, module)


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # x: (..., C); weight, bias: (C,) or None (elementwise_affine=False / bias=False)
    return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=_backend(self))


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Conv1D weights are (in, out); .t() is a view in nn.Linear's (out, in) layout -- no copy.
    y = ops.gelu_mlp(
        hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias,
        activation=getattr(self, _PATCH_ATTR)["activation"], backend=_backend(self),
    )  # (B, T, C)
    return self.dropout(y)


def _attention_forward_cache(
    self,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs,
):
    """GPT2Attention.forward's signature from transformers 5.24 (the KV cache is `cache`)."""
    return _attention_forward(self, "cache", hidden_states, cache, attention_mask, encoder_hidden_states,
                              encoder_attention_mask, output_attentions, kwargs)


def _attention_forward_past_key_values(
    self,
    hidden_states: torch.Tensor,
    past_key_values=None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs,
):
    """GPT2Attention.forward's signature up to transformers 5.23 (the KV cache is `past_key_values`)."""
    return _attention_forward(self, "past_key_values", hidden_states, past_key_values, attention_mask,
                              encoder_hidden_states, encoder_attention_mask, output_attentions, kwargs)


# The patched forward for each name of the cache parameter (see _CACHE_ARGS).
_ATTENTION_FORWARDS = {
    "cache": _attention_forward_cache,
    "past_key_values": _attention_forward_past_key_values,
}


def _attention_forward(self, cache_arg, hidden_states, cache, attention_mask, encoder_hidden_states,
                       encoder_attention_mask, output_attentions, kwargs):
    """GPT2Attention.forward (transformers 5) with the plain causal case on `ops.causal_attention`;
    `cache` arrived under the installed version's name `cache_arg` and goes back under it."""
    state = getattr(self, _PATCH_ATTR)
    if not _fast_path_ok(self, state, hidden_states, cache, attention_mask,
                         encoder_hidden_states, output_attentions, kwargs):
        return _original(self)(
            hidden_states, attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            output_attentions=output_attentions, **{cache_arg: cache}, **kwargs,
        )
    B, T, C = hidden_states.shape
    q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)  # each (B, T, C)
    q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
    v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
    if cache is not None:
        # A prefill: the layer's cache is empty (checked), so update() stores k, v and returns them.
        k, v = cache.update(k, v, self.layer_idx)
        if k.shape[-2] != T:  # cannot happen with an empty DynamicCache; never compute a wrong answer
            raise RuntimeError(
                f"gptfast.patch: layer {self.layer_idx}'s KV cache returned {k.shape[-2]} keys for a "
                f"{T}-token prefill; unpatch the model (gptfast.unpatch) to use this cache"
            )
    dropout_p = self.attn_dropout.p if self.training else 0.0
    # self.scaling = 1/sqrt(hs) (x 1/(layer_idx+1) with scale_attn_by_inverse_layer_idx)
    y = ops.causal_attention(q, k, v, scale=self.scaling, dropout_p=dropout_p, backend=state["backend"])
    y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
    y = self.resid_dropout(self.c_proj(y))
    return y, None  # no attention weights (the original with sdpa returns None as well)


def _fast_path_ok(self, state, hidden_states, cache, attention_mask, encoder_hidden_states,
                  output_attentions, kwargs) -> bool:
    if encoder_hidden_states is not None or self.is_cross_attention or output_attentions:
        return False
    if self.reorder_and_upcast_attn:  # the original's fp32 baddbmm path; keep it exact
        return False
    if self.config._attn_implementation not in _FAST_ATTN_IMPLS:
        return False
    if not _HARMLESS_KWARGS.issuperset(kwargs):
        return False
    if hidden_states.dim() != 3:
        return False
    if cache is not None:
        from transformers.cache_utils import DynamicCache

        # Only an empty plain DynamicCache layer: static / quantized / offloaded caches return
        # more than the new keys, and a filled cache makes this a decode step (not T x T causal).
        if type(cache) is not DynamicCache or cache.get_seq_length(self.layer_idx) != 0:
            return False
    if _recording_attentions():
        return False
    return state["mask_memo"].is_plain_causal(attention_mask, hidden_states.shape[1])


# ----------------------------------------------------------------------------- patch / unpatch


def _bind(module: nn.Module, kind: str, fn, backend: str | None, **extra) -> None:
    # Instance-level, as Liger's _bind_method_to_module: module.__dict__["forward"] shadows the
    # class's forward for this object only. Remember what was there for unpatch.
    saved = module.__dict__.get("forward")
    object.__setattr__(module, _PATCH_ATTR, {"kind": kind, "saved_forward": saved, "backend": backend, **extra})
    module.__dict__["forward"] = MethodType(fn, module)


def is_patched(model: nn.Module) -> bool:
    """True if `patch` has been applied to (some module of) `model`."""
    return any(hasattr(m, _PATCH_ATTR) for m in model.modules())


def patch(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run an existing transformers GPT-2 model's attention, LayerNorm and MLP on gptfast ops.

    Args:
        model: a `transformers` GPT-2 model (`GPT2LMHeadModel`, `GPT2Model`, or any model holding
            `GPT2Block`s), patched in place.
        backend: gptfast op backend ('auto', 'reference', 'torch', 'native', 'triton'; None = the
            global choice at call time, see `gptfast.ops`).
    Returns the same model (for chaining). Patching twice only updates the backend.
    Raises `RuntimeError` for a transformers version this patch was not written for, `TypeError`
    for a model without GPT-2 blocks.
    """
    mg, cache_arg = _gpt2_module()
    if backend is not None:
        ops.requested_backend(backend)  # validates the name now, not at the first forward
    if not isinstance(model, nn.Module):
        raise TypeError(f"gptfast.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, mg.GPT2Block)]
    if not blocks:
        raise TypeError(
            f"gptfast.patch: expected a transformers GPT-2 model (GPT2LMHeadModel / GPT2Model), "
            f"found no GPT2Block in {type(model).__name__}"
        )
    if is_patched(model):  # re-patch: new backend only
        for m in model.modules():
            if hasattr(m, _PATCH_ATTR):
                getattr(m, _PATCH_ATTR)["backend"] = backend
        return model

    memo = _MaskMemo()  # shared by the layers: one mask inspection per forward
    layer_norms = [m for m in model.modules()
                   if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1]
    for ln in layer_norms:
        _bind(ln, "layer_norm", _layer_norm_forward, backend)
    for block in blocks:
        _bind(block.attn, "attention", _ATTENTION_FORWARDS[cache_arg], backend, mask_memo=memo)
        act = block.attn.config.activation_function
        if act in HF_ACTIVATIONS:
            _bind(block.mlp, "mlp", _mlp_forward, backend, activation=HF_ACTIVATIONS[act])
    act = blocks[0].attn.config.activation_function
    if act not in HF_ACTIVATIONS:
        warnings.warn(
            f"gptfast.patch: activation_function={act!r} is not a GELU gptfast computes "
            f"({', '.join(HF_ACTIVATIONS)}); the MLPs keep their original forward",
            stacklevel=2,
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: every patched module gets back the forward it had before. Returns the model."""
    for m in model.modules():
        state = m.__dict__.get(_PATCH_ATTR)
        if state is None:
            continue
        del m.__dict__["forward"]
        if state["saved_forward"] is not None:
            m.__dict__["forward"] = state["saved_forward"]
        del m.__dict__[_PATCH_ATTR]
    return model


__all__ = ["SUPPORTED_TRANSFORMERS", "TESTED_TRANSFORMERS", "is_patched", "patch", "unpatch"]
