"""Build settings of the native extension, shared by setup.py and the JIT loader.

Kept free of gptfast imports: setup.py loads this file by path.
"""

from __future__ import annotations

import glob
import os


def extension_kwargs(root: str, for_setup: bool) -> dict:
    """Keyword arguments for `CppExtension` / `CUDAExtension` / `cpp_extension.load`.

    root: the source checkout holding csrc/. for_setup: True for a distributable build (no
    -march=native), False for a JIT build on the machine that will run it.
    Returns a dict with `sources`, `extra_compile_args` and `with_cuda` (bool).
    """
    sources = [os.path.join(root, "csrc", "registration.cpp")]
    sources += sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17"]
    if not for_setup:
        cxx.append("-march=native")
    return {"sources": sources, "extra_compile_args": {"cxx": cxx}, "with_cuda": False}
