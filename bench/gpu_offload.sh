#!/usr/bin/env bash
# One device call for the offload work: its tests on CUDA (streamed prefill, staged decode
# with no host synchronisation, placement from frequencies, against the resident model), then
# `bench_e2e` at the OPT-13B shape with a 14 GiB budget (8 slots of 532 positions: 29 of 40
# layers offloaded; the 8 GiB one-slot run offloaded 28): engine, launch --workers 1,
# accelerate, FlexGen, the resident engine step; results and logs under $OUT.
# Usage on the device: bash bench/gpu_offload.sh   (FlexGen: carry its wheel in .whl/)
set -uo pipefail
out=${OUT:-gpu_offload_out}; mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout 100 python3 -m pytest -q -p no:cacheprovider \
    tests/test_row_stream.py tests/test_offload.py tests/test_placement_stats.py \
    2>&1 | tee "$out/pytest-gpu.log" | tail -15
# At most 470 s (the results file is rewritten after every row, so a cut run keeps them);
# rows that would start after BUDGET seconds are skipped with the reason.
timeout ${E2E_TIMEOUT:-470} python3 -m dejavu.bench.bench_e2e --shape ${SHAPE:-opt-13b} \
    --gpu-memory-gib ${GIB:-14} --checkpoint-dir /dev/shm/dejavu-e2e-${SHAPE:-opt-13b} \
    --tokens ${TOKENS:-12} --time-budget-s ${BUDGET:-380} --out "$out" 2>&1 \
    | tee "$out/e2e.log" | tail -40
rm -rf /dev/shm/dejavu-e2e-${SHAPE:-opt-13b}
