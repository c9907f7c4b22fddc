#!/usr/bin/env bash
# The native CPU kernels' tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of
# the extension: any out-of-bounds read or write, use after free or UB in csrc/cpu aborts the run
# with a report. Not part of the default test run (a sanitized build takes minutes and the tests
# run several times slower).
#
#   bash tests/run_sanitizers.sh                      # ASan + UBSan, the native op tests
#   GPTFAST_SANITIZE=address bash tests/run_sanitizers.sh tests/test_layer_norm.py -k fuzz
#
# How: GPTFAST_SANITIZE adds -fsanitize=... to the JIT build (gptfast/_build.py; its own build
# directory, since the flags are part of the sources hash), GPTFAST_FORCE_JIT skips the installed
# gptfast._C, and the sanitizer runtimes are LD_PRELOADed because the Python binary itself is not
# instrumented (ASan must be the first library loaded). Leak detection is off: CPython and torch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."

export GPTFAST_SANITIZE="${GPTFAST_SANITIZE:-address,undefined}"
export GPTFAST_FORCE_JIT=1
CC="${CC:-gcc}"
preload=()
IFS=',' read -ra parts <<< "$GPTFAST_SANITIZE"
for part in "${parts[@]}"; do
  case "$part" in
    address) preload+=("$("$CC" -print-file-name=libasan.so)") ;;
    undefined) preload+=("$("$CC" -print-file-name=libubsan.so)") ;;
    *) echo "GPTFAST_SANITIZE: expected address and/or undefined, got '$part'" >&2; exit 2 ;;
  esac
done
for lib in "${preload[@]}"; do
  [[ -f "$lib" ]] || { echo "sanitizer runtime not found: $lib (install gcc's libasan / libubsan)" >&2; exit 2; }
done

export LD_PRELOAD="${preload[*]}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:check_initialization_order=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Build (or reuse) the sanitized extension once, before pytest: loading it needs the runtimes
# preloaded, so the compilers run with them preloaded too (harmless, a little slower).
echo "building the sanitized extension (GPTFAST_SANITIZE=$GPTFAST_SANITIZE) ..."
python -c "from gptfast.ops import native; print('built:', native.load_extension())"
tests=("$@")
if [[ ${#tests[@]} -eq 0 ]]; then
  tests=(tests/test_layer_norm.py tests/test_gelu_mlp.py tests/test_attention.py tests/test_decode_attention.py
         tests/test_sampling.py tests/test_skinny_linear.py tests/test_decode_step.py tests/test_model.py)
fi
python -m pytest -q -p no:xdist -p no:cacheprovider -m "not slow and not gpu" "${tests[@]}"
