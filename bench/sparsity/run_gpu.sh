#!/usr/bin/env bash
# Train the shipped model's predictors and run the quality sweep on one GPU.
#
#   bench/sparsity/run_gpu.sh MODEL_DIR DATA_DIR OUT_DIR [DEVICE]
#
# DATA_DIR holds calib.jsonl.xz (calibration text from the Gutenberg *train* split),
# heldout.jsonl.xz (text from the Gutenberg held-out split) and eval/ (zero-shot task files,
# as in ../shared/data/eval). Writes OUT_DIR/predictors/ and OUT_DIR/sweep/.
set -euo pipefail
model=$1 data=$2 out=$3 device=${4:-cuda}
export PYTHONUNBUFFERED=1
# The package without installing it: a `dejavu` namespace of symlinks to the folders.
site=$(mktemp -d)
mkdir -p "$site/dejavu"
for part in runtime tools kernels scheduler workers; do ln -s "$PWD/$part" "$site/dejavu/$part"; done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
python3 - "$model" "$data" "$out" "$device" <<'PY'
import os, sys
from dejavu.tools.train_predictors import TrainConfig, run
model, data, out, device = sys.argv[1:]
run(model, f"{data}/calib.jsonl.xz", f"{out}/predictors",
    TrainConfig(tokens=int(os.environ.get("TOKENS", 200_000)), per_doc=1536, mlp_recall=0.95, mlp_select="threshold",
                batch_size=512),
    device=device)
PY
python3 -m dejavu.bench.sparsity_sweep --model "$model" --predictors "$out/predictors" \
    --data "$data/heldout.jsonl.xz" --docs 24 --chars 60000 --out "$out/sweep" \
    --device "$device" --eval-dir "$data/eval" \
    --tasks piqa,winogrande,arc_easy,arc_challenge,copa,openbook_qa,lambada --limit 1000 \
    ${SWEEP_ARGS:-}
