#!/usr/bin/env bash
# One device call for the kernels engineer's checks and numbers, in this order:
#   1. the marked GPU tests of the kernels (correctness against the references);
#   2. `dejavu-run bench` (also re-checks every kernel at the benchmarked shapes);
# logs and results land in $OUT. bench/gpu_env.sh makes the checkout importable as `dejavu`
# (nothing is installed) and installs the carried wheels (.whl/, pytest among them).
#   on the device:  bash bench/run_gpu.sh            (BUDGET=seconds for the bench, default 330;
#                                                     SKIP_TESTS=1 skips step 1;
#                                                     ONLY="tune kernels" limits the scenarios)
#   dry run here:   SMALL=1 OUT=/tmp/out bash bench/run_gpu.sh
set -u
OUT=${OUT:-/tmp/bench-out}
BUDGET=${BUDGET:-330}
mkdir -p "$OUT"
source bench/gpu_env.sh
(nvidia-smi; nvidia-smi -q | grep -E "Product Name|Driver Version|CUDA Version|Max Clocks" -A0) > "$OUT/nvidia-smi.txt" 2>&1
ONLY_ARGS=""
CMD_ONLY=""
for o in ${ONLY:-}; do ONLY_ARGS="$ONLY_ARGS'$o', "; CMD_ONLY="$CMD_ONLY --only $o"; done
[ -z "$ONLY_ARGS" ] || ONLY_ARGS="only=($ONLY_ARGS), "
if [ -n "${SKIP_TESTS:-}" ]; then
  ARGS="small=False"
elif [ -z "${SMALL:-}" ]; then
  # every kernel test, on the GPU (the unmarked ones run there too, at their small shapes)
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider ${EXTRA_TESTS:-} tests/test_kernels_mlp.py \
    tests/test_kernels_attention.py tests/test_kernels_select.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -15
  ARGS="small=False"
else
  export TRITON_INTERPRET=1
  ARGS="small=True"; [ -n "$ONLY_ARGS" ] || ONLY_ARGS="only=('tune', 'kernels'), "
fi
timeout $((BUDGET + 90)) python3 - <<PY 2>&1 | tee "$OUT/bench.log"
from pathlib import Path
from dejavu.bench.bench import BenchOptions, main
main(BenchOptions(out_dir=Path("$OUT"), time_budget_s=$BUDGET, $ONLY_ARGS$ARGS,
                  command="bash bench/run_gpu.sh  (= dejavu-run bench --time-budget $BUDGET$CMD_ONLY)"))
PY
ls -la "$OUT"
