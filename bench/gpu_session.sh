#!/usr/bin/env bash
# One device call per phase, each under ten minutes; logs and results under $OUT.
#   PHASE=checks  the CUDA tests of every GPU path (graphs with penalties, offload prefill and
#                 decode, placement, kernels), then the engine's decode step at the OPT-13B
#                 shape, dense vs random 10% of neurons (bench/profile_step.py)
#   PHASE=e2e     bench/bench_e2e.py: offloaded OPT-13B through the product vs accelerate,
#                 FlexGen and the resident step (rows past E2E_BUDGET seconds are skipped)
#   PHASE=train   bench/bench_train_predictors.py at the OPT-13B shape under a 12 GiB budget
#   PHASE=heads   bench/head_variants.py: head-sparse model variants, each trained for
#                 HEADS_BUDGET s, then dense bpb, oracle and predictor head curves; HEADS_DATA
#                 holds train.jsonl.xz, heldout.jsonl.xz and wikitext2_test.txt
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
heads)
    data=${HEADS_DATA:-.carry/heads}
    timeout ${HEADS_TIMEOUT:-570} python3 -m dejavu.bench.head_variants \
        --corpus "$data/train.jsonl.xz" --heldout "$data/heldout.jsonl.xz" \
        --wikitext "$data/wikitext2_test.txt" --device cuda \
        --variants ${HEADS_VARIANTS:-h8,h16,h16-drop0.5,h16-gate0.5} \
        --time-budget-s ${HEADS_BUDGET:-120} --reserve-s 40 --deadline-s ${HEADS_DEADLINE:-545} \
        --docs 6 --chars 24000 --set warmup=100 --work /dev/shm/head_variants --out "$out" \
        2>&1 | tee "$out/heads.log" | tail -40
    rm -rf /dev/shm/head_variants
    ;;
esac
ls -la "$out"
