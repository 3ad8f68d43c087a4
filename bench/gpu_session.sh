#!/usr/bin/env bash
# One device call per phase, each under ten minutes; logs and results under $OUT.
#   PHASE=checks  the CUDA tests of every GPU path (graphs with penalties, offload prefill and
#                 decode, placement, kernels), then the engine's decode step at the OPT-13B
#                 shape, dense vs random 10% of neurons (bench/profile_step.py)
#   PHASE=e2e     bench/bench_e2e.py: offloaded OPT-13B through the product vs accelerate,
#                 FlexGen and the resident step (rows past E2E_BUDGET seconds are skipped),
#                 then bench/profile_offload.py step: one decode step under torch.profiler
#                 (gather GB/s, kernels, syncs, launches) on the same checkpoint, and
#                 profile_offload count: host syncs and launches per offloaded layer
#   PHASE=profile e2e's decode-step profiles alone (profile_offload step, with --cprofile)
#   PHASE=train   bench/bench_train_predictors.py at the OPT-13B shape under a 12 GiB budget
#                 (TRAIN_SHAPE=opt-30b TRAIN_GIB=24 for the larger one; TRAIN_FIT="behind
#                 in-line" runs both fits, paired)
#   PHASE=fused   the GPU tests of the captured sparse step (fused predictor selection, padded
#                 buckets), then the engine's decode step at the OPT-13B shape: dense, random
#                 10% of neurons and calibrated predictors at 10% (fused kernels), batch 1 and
#                 8, with the measured density and each sparse step's top kernels, and the
#                 launches per layer of a captured step (bench/count_launches.py; under 4 min)
#   PHASE=lazy    the CUDA tests of the lazy K/V and padded-union kernels, the offloaded
#                 decode, the graphs and the predictor fit (LAZY_TESTS adds files), then the
#                 resident OPT-13B step, dense and predictors at 10%, with each step's top
#                 kernels by device time (bench/profile_step.py --out)
#   PHASE=hops    the CUDA IPC data plane's GPU tests, then bench/bench_hops.py: one hop
#                 between two processes on one GPU, ring spun on / ring / socket (with the
#                 send/wait/take/sync split), opt-1.3b..66b hidden sizes at batch 1 and 8, and
#                 opt-1.3b 8 streams through 2 workers vs 1; then the same hops under MPS
#                 (label "mps": one GPU context for both processes, no time-slicing), so
#                 context switching and our code's share of a hop show apart
#   PHASE=mps     paired on one machine: opt-1.3b 8 streams through 2 workers vs 1 and the
#                 opt-30b batch-1 hop, as separate CUDA contexts and then under MPS (under 5 min)
#   PHASE=stages  the lookahead CUDA tests, then an offloaded OPT-13B shape over two workers
#                 on one GPU, 1 stream, random 10% of neurons: decode with lookahead (prefetch
#                 and selections sent ahead) off and on (bench/bench_pipeline.py)
#   PHASE=heads   bench/head_variants.py: head-sparse model variants, each trained for
#                 HEADS_BUDGET s, then dense bpb, oracle and predictor head curves; HEADS_DATA
#                 holds train.jsonl.xz, heldout.jsonl.xz and wikitext2_test.txt
#   PHASE=heads-full  one full-length training of a head-sparse variant (tools/train_model.py;
#                 default 16 heads of 32, random head dropout of half the heads of half the
#                 tokens) under the shipped model's limits: --time-budget HEADS_BUDGET (540 s)
#                 from process start to the end of its held-out/WikiText-2 evaluation, on the
#                 whole training split (HEADS_DATA/train.jsonl.xz); the float16 model comes
#                 back as 15 MiB parts (cat model.safetensors.part* > model.safetensors)
#   PHASE=heads-pred  train-predictors (GPU, 100k tokens) for the model heads-full kept in /dev/shm
#                 (KEEP_CKPT=1 on that call); predictors.safetensors comes back in parts
#   PHASE=heads-eval  bench/head_variants.py --model: the shipped model and HEADS_MODEL (default
#                 the heads-full model that heads-pred left in /dev/shm with KEEP_CKPT=1), each
#                 with its own predictors/, on one held-out slice (HEADS_DOCS books x 24,000
#                 characters) and WikiText-2: dense bits per byte, oracle and predictor head
#                 curves with document-level standard errors, the shipped-default target
#   PHASE=predictors  the captured decode with own-MLP-input predictors (test_graphs,
#                 test_fused_select: fused selection reading each layer's own LayerNorm), then
#                 the shipped predictors' held-out recall and the CPU sweep grid on 24 books
#                 (HEADS_DATA/heldout.jsonl.xz, carried: ../shared does not travel)
#   PHASE=tests   the test files TESTS names (default: the captured fit, the compile counter and
#                 the offloaded decode), on the GPU
# Usage on the device: PHASE=checks bash bench/gpu_session.sh (several: PHASE="fused hops")
set -uo pipefail
out=${OUT:-gpu_session_out}; mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
# Runs its arguments as MPS clients: the daemon in a private directory (the bench processes
# inherit the pipe directory), told to quit afterwards; its logs say which clients came.
under_mps() {
    local mps; mps=$(mktemp -d)
    export CUDA_MPS_PIPE_DIRECTORY=$mps/pipe CUDA_MPS_LOG_DIRECTORY=$mps/log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d; then
        timeout ${HOPS_MPS_TIMEOUT:-170} "$@" 2>&1 | tee "$out/hops-mps.log" | tail -25
        echo get_server_list | nvidia-cuda-mps-control 2>&1 | sed 's/^/mps servers: /' \
            | tee -a "$out/hops-mps.log"
        echo quit | nvidia-cuda-mps-control
        sleep 1
        for f in $CUDA_MPS_LOG_DIRECTORY/*.log; do
            [ -f "$f" ] && cp "$f" "$out/mps-$(basename $f)"
        done
        rm -rf /dev/shm/dejavu-hops-opt-1.3b
    else
        echo "MPS did not start here: no mps rows" | tee "$out/hops-mps.log"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    rm -rf $mps
}
# One offloaded OPT-13B decode step per head share (PROFILE_HEADS) in the engine generate
# builds: timed plainly (wall, host issue, device), under cProfile, then under torch.profiler.
profile_steps() {
    for heads in ${PROFILE_HEADS:-1.0 0.5}; do
        timeout ${PROFILE_TIMEOUT:-90} python3 -m dejavu.bench.profile_offload step \
            --shape opt-13b --gpu-memory-gib ${GIB:-14} --checkpoint-dir $ckpt --heads $heads \
            --table --cprofile "$out/cprofile-heads$heads.txt" \
            --out "$out/profile-offload-heads$heads.json" 2>&1 \
            | tee -a "$out/profile_offload.log" | tail -30
    done
}
# The random OPT-13B checkpoint of e2e and stages (reused when complete; KEEP_CKPT=1 keeps it
# for a later call on the same machine).
ckpt=${CKPT:-/dev/shm/dejavu-opt-13b}
for phase in ${PHASE:-checks}; do
echo "== phase $phase $(date -u +%H:%M:%S)"
case "$phase" in
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
    timeout ${E2E_TIMEOUT:-400} python3 -m dejavu.bench.bench_e2e --shape opt-13b \
        --gpu-memory-gib ${GIB:-14} --checkpoint-dir $ckpt \
        --tokens ${TOKENS:-12} --time-budget-s ${E2E_BUDGET:-300} ${E2E_ARGS:-} --out "$out" \
        2>&1 | tee "$out/e2e.log" | tail -40
    profile_steps
    # Host syncs and launches per offloaded layer and decode step (a small model: seconds),
    # and the padded-union decode under CUDA's sync debug mode set to error.
    if [ -z "${SKIP_COUNT:-}" ]; then
        timeout 120 python3 -m dejavu.bench.profile_offload count --heads 1.0,0.5 \
            --out "$out/count-offload.json" 2>&1 | tee -a "$out/profile_offload.log" | tail -40
        timeout 120 python3 -m pytest -q tests/test_offload_decode.py -k "sync" 2>&1 | tail -4
    fi
    [ -n "${KEEP_CKPT:-}" ] || rm -rf $ckpt
    ;;
tests)
    timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        ${TESTS:-tests/test_captured_fit.py tests/test_compiles.py tests/test_offload_decode.py} \
        2>&1 | tee "$out/pytest-tests.log" | tail -15
    ;;
profile)
    profile_steps
    [ -n "${KEEP_CKPT:-}" ] || rm -rf $ckpt
    ;;
train)
    # TRAIN_CKPT=$ckpt reuses e2e's checkpoint (same writer); run it after e2e: it leaves
    # predictors/ in the checkpoint, which a later e2e would load.
    tckpt=${TRAIN_CKPT:-/dev/shm/${TRAIN_SHAPE:-opt-13b}}
    timeout ${TRAIN_TIMEOUT:-560} python3 -m dejavu.bench.bench_train_predictors \
        --shape ${TRAIN_SHAPE:-opt-13b} --gpu-memory-gib ${TRAIN_GIB:-12} --tokens ${CAL_TOKENS:-100000} --batch-size 2048 --lr 0.02 \
        --train-timeout-s ${TRAIN_CUT:-$(( ${TRAIN_TIMEOUT:-560} - 120 ))} \
        --fit ${TRAIN_FIT:-default} --checkpoint-dir $tckpt --out "$out" 2>&1 | tee "$out/train.log" | tail -60
    rm -rf $tckpt
    ;;
fused)
    timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_fused_select.py tests/test_graphs.py tests/test_kernels_select.py \
        tests/test_profile_step.py tests/test_kernels_layer_norm.py tests/test_count_launches.py \
        tests/test_kernels_attention.py::test_decode_attention_writes_this_steps_kv_as_the_cache_writes_would \
        tests/test_kernels_mlp.py::test_chained_kernel_in_a_workspace_the_caller_zeroes \
        2>&1 | tee "$out/pytest-fused.log" | tail -15
    timeout 60 python3 -m dejavu.bench.count_launches --layers 2,4 --batch 1,8 2>&1 \
        | tee "$out/count_launches.log" | tail -6
    for select in "" "--mlp-density 0.1 --select random" "--mlp-density 0.1 --select predictors"; do
        timeout 80 python3 -m dejavu.bench.profile_step --shape opt-13b --batch 1,8 --steps 20 \
            --out "$out/profiles" $select 2>&1 | tee -a "$out/profile_step.log" | tail -70
    done
    ;;
lazy)
    timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_lazy_kv.py tests/test_kernels_select.py tests/test_offload_decode.py \
        tests/test_graphs.py tests/test_sparse_backend.py tests/test_row_stream.py \
        ${LAZY_TESTS:-} 2>&1 | tee "$out/pytest-lazy.log" | tail -15
    for select in "" "--mlp-density 0.1 --select predictors"; do
        timeout 80 python3 -m dejavu.bench.profile_step --shape opt-13b --batch 1 --steps 20 \
            --out "$out/profiles" $select 2>&1 | tee -a "$out/profile_step.log" | tail -40
    done
    ;;
hops)
    timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_data_plane.py -m gpu 2>&1 | tee "$out/pytest-hops.log" | tail -15
    timeout ${HOPS_TIMEOUT:-170} python3 -m dejavu.bench.bench_hops --throughput --out "$out" \
        2>&1 | tee "$out/hops.log" | tail -25
    rm -rf /dev/shm/dejavu-hops-opt-1.3b
    under_mps python3 -m dejavu.bench.bench_hops --label mps --out "$out"
    ;;
mps)
    # Two workers sharing the GPU against one, paired on this machine: as separate CUDA
    # contexts (time-sliced) and as MPS clients (one context), with the opt-30b hop beside.
    timeout ${HOPS_TIMEOUT:-170} python3 -m dejavu.bench.bench_hops --throughput \
        --shapes opt-30b --batch 1 --out "$out" 2>&1 | tee "$out/hops.log" | tail -8
    rm -rf /dev/shm/dejavu-hops-opt-1.3b
    under_mps python3 -m dejavu.bench.bench_hops --label mps --throughput --shapes opt-30b \
        --batch 1 --out "$out"
    ;;
stages)
    timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_lookahead.py \
        tests/test_row_stream.py 2>&1 | tee "$out/pytest-stages.log" | tail -8
    timeout ${STAGES_TIMEOUT:-420} python3 -m dejavu.bench.bench_pipeline --shape opt-13b \
        --workers 2 --share-gpu --streams 1 --tokens ${TOKENS:-12} --prompt-len 16 \
        --gpu-memory-gib ${STAGES_GIB:-7} --select random:0.1 --lookahead off,on \
        --checkpoint-dir $ckpt --out "$out" 2>&1 \
        | tee "$out/stages.log" | tail -20
    [ -n "${KEEP_CKPT:-}" ] || rm -rf $ckpt
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
heads-full)
    data=${HEADS_DATA:-.carry/heads}
    work=/dev/shm/heads-full; rm -rf $work
    timeout 590 python3 -m dejavu.tools.train_model --corpus "$data/train.jsonl.xz" \
        --tokenizer models/opt-gutenberg-31m/tokenizer.json --out $work \
        --heldout "$data/heldout.jsonl.xz" --wikitext "$data/wikitext2_test.txt" \
        --heads ${HEADS_N:-16} --head-policy ${HEADS_POLICY:-drop} --head-fraction 0.5 \
        --time-budget ${HEADS_BUDGET:-540} --reserve ${HEADS_RESERVE:-110} 2>&1 \
        | tee "$out/train.log" | tail -30
    cp $work/config.json $work/metrics.json "$out/" 2>/dev/null
    (cd $work && sha256sum model.safetensors && split -b 15728640 -d -a 2 model.safetensors \
        "$out/model.safetensors.part") | tee -a "$out/train.log"
    [ -n "${KEEP_CKPT:-}" ] || rm -rf $work
    ;;
heads-pred)
    # The predictors of the model heads-full left in /dev/shm (KEEP_CKPT=1 on that call), as the
    # shipped ones were made (README) but on the GPU, with head predictors at 8 epochs and the
    # file's default operating point at HEADS_POINT of the heads.
    data=${HEADS_DATA:-.carry/heads}
    work=/dev/shm/heads-full
    timeout ${PRED_TIMEOUT:-300} python3 -c "from dejavu.tools.cli import app; app()" \
        train-predictors --model $work --data "$data/train.jsonl.xz" --out $work/predictors \
        --tokens 100000 --select threshold --mlp-recall 0.96 --head-point ${HEADS_POINT:-0.5} \
        --device cuda 2>&1 | tee "$out/train-predictors.log" | tail -25
    cp $work/predictors/report.md $work/predictors/report.json "$out/" 2>/dev/null
    (cd $work/predictors && sha256sum *.safetensors && cp frequencies.safetensors "$out/" \
        && split -b 15728640 -d -a 2 predictors.safetensors "$out/predictors.safetensors.part") \
        | tee -a "$out/train-predictors.log"
    [ -n "${KEEP_CKPT:-}" ] || rm -rf $work
    ;;
heads-eval)
    data=${HEADS_DATA:-.carry/heads}
    model=${HEADS_MODEL:-/dev/shm/heads-full}
    timeout ${HEADS_TIMEOUT:-570} python3 -m dejavu.bench.head_variants \
        --model models/opt-gutenberg-31m --model $model --heldout "$data/heldout.jsonl.xz" \
        --wikitext "$data/wikitext2_test.txt" --docs ${HEADS_DOCS:-48} --chars 24000 \
        --device cuda --out "$out" 2>&1 | tee "$out/heads-eval.log" | tail -30
    [ -n "${KEEP_CKPT:-}" ] || rm -rf /dev/shm/heads-full
    ;;
predictors)
    # ../shared does not travel to the device: the held-out split is carried (HEADS_DATA).
    heldout=${HEADS_DATA:-.carry/heads}/heldout.jsonl.xz
    timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_graphs.py \
        tests/test_fused_select.py tests/test_predictors.py 2>&1 \
        | tee "$out/pytest-predictors.log" | tail -15
    timeout 120 python3 -m dejavu.bench.sparsity_recall \
        --data "$heldout" --docs 24 --chars 90000 \
        --recalls 0.9,0.95,0.955,0.96,0.965 2>&1 | tee "$out/recall.log" | tail -12
    timeout 280 python3 -m dejavu.bench.sparsity_sweep --model models/opt-gutenberg-31m \
        --data "$heldout" --grid cpu --docs 24 --chars 90000 \
        --device cuda --out "$out/sparsity" 2>&1 | tee "$out/sweep.log" | tail -20
    ;;
*) echo "unknown phase $phase" ;;
esac
done
ls -la "$out"
