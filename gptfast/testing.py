"""The project's one accuracy rule, shared by the tests and the benchmarks' pre-timing checks.

FlashAttention's rule (https://github.com/Dao-AILab/flash-attention, tests/test_flash_attn.py):
compute the truth in fp64 from the same inputs, and let a kernel be off from it by at most
`factor` (2) times the error that plain PyTorch makes in the same dtype on the same inputs, plus a
floor of two roundings of the output (`2 * eps(dtype) * max|truth|`, as FlashAttention's `fwd_atol
= 2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max()`) for shapes where PyTorch happens to be exact. The allowance adapts to each shape and dtype honestly: fp32 gets fp32-sized room, bf16
gets bf16-sized room, and a wrong kernel (a missed mask, a stale row, an off-by-one) is off by far
more than rounding either way. Nothing here is a fixed tolerance.

    truth = op(*(x.double() for x in inputs))          # fp64
    baseline = op(*inputs)                              # plain PyTorch (the `reference` backend), dtype
    assert_error_within(kernel_out, truth, baseline)    # |out - truth| <= 2 |baseline - truth| + floor
"""

from __future__ import annotations

import math

import torch

FACTOR = 2.0  # "at most ~2x PyTorch's own error for the dtype"
# PyTorch's fused op for the same computation (the `torch` backend) is PyTorch's own error too and
# may reduce in another order (seen: F.layer_norm's backward dW / dB over ~100-1000 rows is 3-6x
# the composite's error, and changes with the thread count). It joins the baseline only while its
# error is within TORCH_TRUST x the composite's: rounding differs by small factors, a wrong wrapper
# by orders of magnitude (and is then caught, not allowed to widen the tolerance).
TORCH_TRUST = 10.0


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def output_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """Two roundings of the output in `dtype`: 2 eps(dtype) x max|truth| (the floor of the rule)."""
    return 2 * torch.finfo(dtype).eps * max(_max_abs(truth), torch.finfo(dtype).tiny)


def error_report(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, *,
                 factor: float = FACTOR, atol: float | None = None, what: str = "") -> str | None:
    """None when max|actual - truth| <= factor * max|baseline - truth| + floor, else a message that
    says how far off it is and where (the worst few indices).

    actual: the kernel's output (any dtype); truth: the same computation in fp64 (or the best
    reference available); baseline: plain PyTorch in actual's dtype on the same inputs (or a list of
    PyTorch implementations: the largest of their errors is PyTorch's own). `atol` (the floor)
    defaults to output_floor(truth, actual.dtype). A NaN in actual where truth has none (or the
    other way round) always fails.
    """
    if tuple(actual.shape) != tuple(truth.shape):
        return f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    baselines = [baseline] if torch.is_tensor(baseline) else list(baseline)
    a, t = actual.detach().double(), truth.detach().double()
    floor = output_floor(truth, actual.dtype) if atol is None else atol
    nan_mismatch = torch.isnan(a) != torch.isnan(t)
    same_inf = torch.isinf(a) & torch.isinf(t) & (a == t)
    err = torch.where(same_inf | (torch.isnan(a) & torch.isnan(t)), torch.zeros_like(a), (a - t).abs())
    theirs = 0.0
    for b in baselines:  # several PyTorch implementations: PyTorch's error is the largest of theirs
        base_err = torch.where(torch.isfinite(t), (b.detach().double() - t).abs(), torch.zeros_like(t))
        theirs = max(theirs, base_err.nan_to_num(math.inf).max().item() if base_err.numel() else 0.0)
    allowed = factor * theirs + floor
    ours = err.nan_to_num(math.inf).max().item() if err.numel() else 0.0
    if ours <= allowed and not bool(nan_mismatch.any()):
        return None
    flat = err.nan_to_num(math.inf).flatten()
    worst = torch.topk(flat, min(5, flat.numel())).indices
    idx = [tuple(int(i) for i in torch.unravel_index(w, err.shape)) for w in worst]
    detail = ", ".join(f"{i}: got {a[i].item():.6g} want {t[i].item():.6g}" for i in idx)
    return (f"{what}: max error {ours:.3g} exceeds {factor:g} x PyTorch's {theirs:.3g} + {floor:.3g} "
            f"(the {actual.dtype} rule); worst {detail}")


def pytorch_baselines(truth: torch.Tensor, composite: torch.Tensor, fused: torch.Tensor | None = None,
                      *, trust: float = TORCH_TRUST) -> list[torch.Tensor]:
    """PyTorch's own results in the dtype, for `error_report`'s `baseline`: the plain-PyTorch
    composite (the `reference` backend), plus PyTorch's fused op when its error is within `trust`
    x the composite's (see TORCH_TRUST)."""
    if fused is not None and error_report(fused, truth, composite, factor=trust) is None:
        return [composite, fused]
    return [composite]


def assert_error_within(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, *,
                        factor: float = FACTOR, atol: float | None = None, what: str = "") -> None:
    """Raise AssertionError (with where and how much) when `error_report` finds a violation."""
    msg = error_report(actual, truth, baseline, factor=factor, atol=atol, what=what)
    if msg is not None:
        raise AssertionError(msg)


__all__ = ["FACTOR", "TORCH_TRUST", "assert_error_within", "error_report", "output_floor", "pytorch_baselines"]
