"""Build settings of the native extension, shared by setup.py and the JIT loader.

Kept free of gptfast imports: setup.py loads this file by path.

Two builds use these settings:
- `setup.py` (`pip install --no-build-isolation -e .`): `gptfast._C`, tuned with `-march=native` for
  the machine that builds it; a wheel for other machines (`GPTFAST_PORTABLE_BUILD=1`, the default
  when setup.py runs `bdist_wheel`) has no `-march=native`: its hot CPU loops carry `target_clones`
  (see csrc/cpu/simd.h) and pick AVX-512 / AVX2 / baseline code at load time.
- `gptfast.ops.native` JIT-builds the same sources with `torch.utils.cpp_extension.load` when
  `gptfast._C` is absent or stale; it runs on the machine that builds it, so `-march=native` is fine.

`sources_hash` names a build: a `gptfast._C` built by setup.py records it in `_C.sources_hash` next
to the library, and the JIT loader builds into `ext-<hash>`; a checkout whose sources changed since
the install therefore JIT-builds instead of loading stale kernels.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil

HASH_FILE_SUFFIX = ".sources_hash"  # written next to gptfast/_C*.so by setup.py


def cpu_sources(root: str) -> list[str]:
    """csrc/registration.cpp (the op schemas) + every csrc/cpu/*.cpp, sorted (stable hash)."""
    return [os.path.join(root, "csrc", "registration.cpp")] + sorted(
        glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp"))
    )


def cuda_sources(root: str) -> list[str]:
    return sorted(
        glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp"))
    )


def _headers(root: str, cuda: bool) -> list[str]:
    pats = ("*.h", "*.hpp", "*.cuh")
    dirs = ("cpu", "cuda", "") if cuda else ("cpu", "")
    return sorted(p for d in dirs for pat in pats for p in glob.glob(os.path.join(root, "csrc", d, pat)))


def with_cuda(root: str) -> bool:
    """CUDA sources are compiled only with a CUDA torch, a CUDA toolkit (nvcc) and csrc/cuda sources."""
    if not cuda_sources(root):
        return False
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return False
    if not torch.version.cuda:
        return False
    return bool(cpp_extension.CUDA_HOME) or shutil.which("nvcc") is not None


DEFAULT_CUDA_ARCHS = "80;90"  # A100 / H100; override with GPTFAST_CUDA_ARCHS="80;86;89;90"


def cuda_archs_default() -> list[str]:
    """The archs a build without $GPTFAST_CUDA_ARCHS ships (what CI compiles): ["80", "90"]."""
    return DEFAULT_CUDA_ARCHS.split(";")


def cuda_archs() -> list[str]:
    """Compute capabilities to build for, from $GPTFAST_CUDA_ARCHS (e.g. "80;90"; "90a" allowed)."""
    raw = os.environ.get("GPTFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not (a[:-1].isdigit() if a.endswith("a") else a.isdigit()):
            raise ValueError(f"GPTFAST_CUDA_ARCHS: expected compute capabilities like '80;90', got {raw!r}")
    return archs


def nvcc_flags(archs: list[str] | None = None) -> list[str]:
    """nvcc flags of csrc/cuda/*.cu (the build and tests/test_cuda_compile.py use the same ones).

    No --use_fast_math: it would turn the IEEE divisions and sqrt of LayerNorm and of sampling
    (whose fp32 `logits / T` and `p / Z` must round as the reference's do) into approximations
    and flush denormals everywhere; the kernels call the fast paths (exp2f on pre-scaled
    scores) explicitly where they are safe. -lineinfo maps compute-sanitizer reports to source
    lines at no runtime cost. SASS for each arch, plus PTX of the newest one so that a newer GPU
    (e.g. sm_100) can JIT the kernels instead of failing with "no kernel image".
    """
    archs = cuda_archs() if archs is None else archs
    flags = ["-O3", "-std=c++17", "-lineinfo"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if archs:
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def extension_kwargs(root: str, for_setup: bool) -> dict:
    """Keyword arguments for `CppExtension` / `CUDAExtension` / `cpp_extension.load`.

    root: the source checkout holding csrc/. for_setup: True for a distributable build (no
    -march=native), False for a JIT build on the machine that will run it.
    Returns a dict with `sources`, `extra_compile_args`, `extra_link_args` and `with_cuda` (bool).
    """
    cuda = with_cuda(root)
    sources = cpu_sources(root) + (cuda_sources(root) if cuda else [])
    # -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel` (ATen's OpenMP
    # backend); without the flag the pragma is ignored and every kernel runs on one thread. The
    # link flag adds libgomp.so.1, which resolves to the copy torch has already loaded (same soname),
    # so the extension shares torch's thread pool and honours torch.set_num_threads.
    # -fno-trapping-math: we never read floating-point exception flags, and without it GCC will
    # not if-convert a float comparison inside a loop (e.g. the clamps of simd.h's fast_exp), so
    # every such loop stayed scalar: GELU's pass over the MLP's (M, 3072) activations ran 8x slower.
    # It changes no result (no reassociation, no contraction: that is -ffast-math's business).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    if for_setup and os.environ.get("GPTFAST_PORTABLE_BUILD") == "1":
        # Wheels for other machines: baseline x86-64 plus GCC target_clones of the kernel entry
        # points (csrc/cpu/simd.h). Slower: code inside at::parallel_for lambdas is not cloned.
        cxx.append("-DGPTFAST_PORTABLE")
    else:
        # `pip install -e .` builds on the machine that runs it: tune for it, as the JIT build does.
        cxx.append("-march=native")
    link = ["-fopenmp"]
    sanitize = os.environ.get("GPTFAST_SANITIZE")
    if sanitize:
        # Debug builds for tests/run_sanitizers.sh, e.g. GPTFAST_SANITIZE=address,undefined: the flags
        # are part of sources_hash, so such a build gets its own JIT directory and never replaces the
        # normal one. Python itself is not instrumented: the script LD_PRELOADs the runtime.
        if not all(part in ("address", "undefined") for part in sanitize.split(",")):
            raise ValueError(f"GPTFAST_SANITIZE: expected 'address', 'undefined' or both, got {sanitize!r}")
        san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
        cxx += san
        link += san
    extra = {"cxx": cxx}
    if cuda:
        extra["nvcc"] = nvcc_flags()
    return {"sources": sources, "extra_compile_args": extra, "extra_link_args": link, "with_cuda": cuda}


def sources_hash(root: str, for_setup: bool) -> str:
    """sha256 (16 hex digits) over the sources, headers, compile flags, torch and Python versions."""
    import sys

    try:
        import torch

        torch_version = torch.__version__ + "|" + str(torch.version.cuda)
    except ImportError:
        torch_version = "no-torch"
    kw = extension_kwargs(root, for_setup)
    h = hashlib.sha256()
    h.update(f"{torch_version}|{sys.version_info[:2]}|{kw['extra_compile_args']}|{kw['extra_link_args']}".encode())
    for path in kw["sources"] + _headers(root, kw["with_cuda"]):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]
