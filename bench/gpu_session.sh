#!/usr/bin/env bash
# One device call per phase, each under ten minutes; logs and results under $OUT.
#   PHASE=checks  the CUDA tests of every GPU path (graphs with penalties, offload prefill and
#                 decode, placement, kernels), then the engine's decode step at the OPT-13B
#                 shape, dense vs random 10% of neurons (bench/profile_step.py)
#   PHASE=e2e     bench/bench_e2e.py: offloaded OPT-13B through the product vs accelerate,
#                 FlexGen and the resident step (rows past E2E_BUDGET seconds are skipped)
#   PHASE=train   bench/bench_train_predictors.py at the OPT-13B shape under a 12 GiB budget
#   PHASE=fused   the GPU tests of the captured sparse step (fused predictor selection, padded
#                 buckets), then the engine's decode step at the OPT-13B shape: dense, random
#                 10% of neurons and calibrated predictors at 10% (fused kernels), batch 1 and
#                 8, with the measured density and each sparse step's top kernels, and the
#                 launches per layer of a captured step (bench/count_launches.py; under 4 min)
# Usage on the device: PHASE=checks bash bench/gpu_session.sh
set -uo pipefail
out=${OUT:-gpu_session_out}; mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
case "${PHASE:-checks}" in
checks)
    timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_graphs.py tests/test_offload.py tests/test_row_stream.py \
        tests/test_placement_stats.py tests/test_penalties.py tests/test_sparse_backend.py \
        tests/test_weight_store.py tests/test_offload_cache.py tests/test_kernels_gather.py \
        tests/test_kernels_select.py tests/test_kernels_mlp.py tests/test_kernels_attention.py \
        2>&1 | tee "$out/pytest-gpu.log" | tail -25
    for density in "" "--mlp-density 0.1"; do
        timeout 120 python3 -m dejavu.bench.profile_step --shape opt-13b --batch 1,8 --steps 20 \
            $density 2>&1 | tee -a "$out/profile_step.log" | tail -8
    done
    ;;
e2e)
    timeout ${E2E_TIMEOUT:-560} python3 -m dejavu.bench.bench_e2e --shape opt-13b \
        --gpu-memory-gib ${GIB:-14} --checkpoint-dir /dev/shm/dejavu-e2e-opt-13b \
        --tokens ${TOKENS:-12} --time-budget-s ${E2E_BUDGET:-420} --out "$out" 2>&1 \
        | tee "$out/e2e.log" | tail -40
    rm -rf /dev/shm/dejavu-e2e-opt-13b
    ;;
train)
    timeout ${TRAIN_TIMEOUT:-560} python3 -m dejavu.bench.bench_train_predictors --shape opt-13b \
        --gpu-memory-gib 12 --tokens ${CAL_TOKENS:-100000} --batch-size 2048 --lr 0.02 \
        --checkpoint-dir /dev/shm/opt-13b --out "$out" 2>&1 | tee "$out/train.log" | tail -30
    rm -rf /dev/shm/opt-13b
    ;;
fused)
    timeout ${TEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_fused_select.py tests/test_graphs.py tests/test_kernels_select.py \
        tests/test_profile_step.py 2>&1 | tee "$out/pytest-fused.log" | tail -15
    timeout 60 python3 -m dejavu.bench.count_launches --layers 2,4 --batch 1,8 2>&1 \
        | tee "$out/count_launches.log" | tail -6
    for select in "" "--mlp-density 0.1 --select random" "--mlp-density 0.1 --select predictors"; do
        timeout 80 python3 -m dejavu.bench.profile_step --shape opt-13b --batch 1,8 --steps 20 \
            --out "$out/profiles" $select 2>&1 | tee -a "$out/profile_step.log" | tail -70
    done
    ;;
esac
ls -la "$out"
