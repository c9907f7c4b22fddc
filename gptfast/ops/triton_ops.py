"""The `triton` backend: adapters from the dispatch layer to the kernels in `kernels/`."""

from __future__ import annotations

NAME = "triton"


def availability(device_type: str) -> str | None:
    return "no Triton kernels yet"


def unsupported(op: str, **call) -> str | None:
    return None
