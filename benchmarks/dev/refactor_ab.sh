#!/bin/bash
# Same-run A/B of the one-forward refactor (#17): the old tree and this one, alternating order per
# round, each round a fresh process per tree running refactor_ab.py (generation B1/B8 fp32 + bf16
# weights, B20 python step, the torch backend, bench train's step).
# usage: OLD_TREE=/path/to/checkout-of-413d8dd benchmarks/dev/refactor_ab.sh ROUNDS OUT.jsonl
# (the old tree takes the old API: generate(..., weight_dtype="bf16"); run from an environment
# with gptfast's dependencies; each tree's native extension is JIT-built on first use)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
for r in $(seq 1 $1); do
  for t in old new; do
    if [ $((r % 2)) = 0 ]; then t=$([ $t = old ] && echo new || echo old); fi
    if [ $t = old ]; then dir=${OLD_TREE:?set OLD_TREE to a checkout of the old commit}; else dir=${NEW_TREE:-$(cd "$HERE/../.." && pwd)}; fi
    (cd "${TMPDIR:-/tmp}" && PYTHONPATH=$dir OMP_NUM_THREADS=${AB_THREADS:-2} AB_THREADS=${AB_THREADS:-2} python "$HERE/refactor_ab.py" $t | sed "s/^{/{\"tree\": \"$t\", \"round\": $r, /") >> "$OUT"
    echo "round $r $t done $(uptime)" >&2
  done
done
