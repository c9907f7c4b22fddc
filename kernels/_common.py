"""Helpers shared by the Triton kernel files: interpreter detection, autotune config choice.

Under `TRITON_INTERPRET=1` (CPU, CI) every `@triton.jit` kernel runs in Python/numpy: autotuning
would time every config in that slow mode, so each kernel file asks `configs(gpu, interp)` for a
single small config there. On a GPU the small config lists below are valid on sm_80 and sm_90
(shared memory stays under ~100 KB per config for head dims up to 128).
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configs(gpu: list[triton.Config], interp: list[triton.Config]) -> list[triton.Config]:
    """The autotune candidates: the GPU list, or the single interpreter config."""
    return interp if INTERPRET else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 ("ieee") for fp32 inputs, so fp32 calls match the fp32
    reference to ~1e-6 instead of TF32's ~1e-3; fp16/bf16 ignore it (tensor cores, fp32 accumulate)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def bucket(n: int) -> int:
    """Autotune key bucket for a size that changes every call (T, M): the next power of two, so a
    new sequence length retunes only when it crosses a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def check_cuda_or_interpret(name: str, *tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors with the interpreter on."""
    for t in tensors:
        if t is None:
            continue
        if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
            raise ValueError(
                f"{name}: tensors must be on a CUDA device (or on CPU with TRITON_INTERPRET=1), "
                f"got {t.device}"
            )
