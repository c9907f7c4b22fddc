#!/usr/bin/env bash
# Run the CUDA kernel tests under NVIDIA compute-sanitizer (a GPU machine with the CUDA toolkit).
#
#   benchmarks/run_compute_sanitizer.sh            # memcheck (out-of-bounds / misaligned accesses)
#   TOOL=racecheck benchmarks/run_compute_sanitizer.sh   # shared-memory races (slow)
#   TOOL=initcheck benchmarks/run_compute_sanitizer.sh   # reads of uninitialised global memory
#   TOOL=synccheck benchmarks/run_compute_sanitizer.sh   # illegal __syncthreads / shuffle use
#   benchmarks/run_compute_sanitizer.sh -k decode        # extra arguments go to pytest
#
# Prerequisites: the native extension built with CUDA kernels, e.g.
#   pip install --no-deps --no-build-isolation -e .      # keeps the preinstalled CUDA torch
# (or let gptfast.ops.native JIT-build it on first use). The kernels are compiled with -lineinfo
# (gptfast/_build.py), so reports name source lines of csrc/cuda/*.cu.
#
# Notes:
# - The sanitizer slows kernels 10-100x: the tests keep shapes small, but expect minutes.
# - cuBLAS (the MLP's matmuls) and torch's own kernels are checked too; --error-exitcode makes any
#   report fail the run. No --leak-check: torch keeps allocations alive until process exit.
# - PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every torch allocation a real cudaMalloc, so an access
#   past the end of a tensor is caught instead of landing inside the caching allocator's pool.
set -euo pipefail

cd "$(dirname "$0")/.."
TOOL="${TOOL:-memcheck}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
if [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
exec "$SANITIZER" --tool "$TOOL" --error-exitcode 1 --print-limit 20 \
  python -m pytest tests/test_cuda_ops.py tests/test_cuda_quant.py -q -x -p no:cacheprovider "$@"
