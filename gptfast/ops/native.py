"""The `native` backend: gptfast's C++ (CPU) and CUDA kernels, registered with `torch.library`.

Not built yet: the native-kernel issue provides `csrc/` and fills this module in.
"""

from __future__ import annotations

NAME = "native"


def availability(device_type: str) -> str | None:
    return "not built yet (csrc/ has no kernels)"


def unsupported(op: str, **call) -> str | None:
    return None
