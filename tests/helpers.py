"""Shared test utilities: backend lists and comparisons that say where and how much."""

from __future__ import annotations

import torch

from gptfast import ops


def available_backends(op: str, device_type: str = "cpu", include_reference: bool = False, **call) -> list[str]:
    """Backends that can run `op` here (the reference is the truth, so left out by default).

    Backends that are *expected* here but unavailable are a failure, not a skip: see
    tests/test_dispatch.py, which asserts that `native` builds on CPU.
    """
    names = [b for b in ops.BACKENDS if include_reference or b != "reference"]
    return [b for b in names if ops.unavailable_reason(b, op, device_type, **call) is None]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """torch.testing-style closeness check whose failure lists the worst offending indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        flat = torch.nonzero(bad)
        worst = torch.topk(err.nan_to_num(float("inf")).flatten(), min(5, err.numel())).indices
        idx = [tuple(int(i) for i in torch.unravel_index(w, err.shape)) for w in worst]
        detail = ", ".join(f"{i}: got {a[i].item():.6g} want {e[i].item():.6g}" for i in idx)
        raise AssertionError(
            f"{what}: {len(flat)}/{err.numel()} elements differ (max abs err {err.max().item():.3g}, "
            f"atol {atol}, rtol {rtol}); worst {detail}"
        )


# The project's one tolerance rule (fp64 truth, at most 2x PyTorch's own error in the dtype): see
# gptfast/testing.py, shared with the benchmarks.
from gptfast.testing import assert_error_within, error_report  # noqa: E402,F401
