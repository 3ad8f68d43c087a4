#!/usr/bin/env bash
# One device call that checks the GPU paths end to end: the GPU-marked tests and the
# kernel-backed sparse tests on CUDA, then the shipped model generating through the engine
# dense, sparse on the torch backend and sparse on the Triton backend (tokens compared;
# wall times include loading and compilation, so they are a smoke check, not a benchmark).
# Usage on the device: bash bench/gpu_check.sh   (logs under $OUT, or ./gpu_check_out)
set -uo pipefail
out=${OUT:-gpu_check_out}; mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_sparse_backend.py tests/test_offload.py tests/test_kernels_mlp.py \
    tests/test_kernels_attention.py tests/test_kernels_select.py tests/test_weight_store.py \
    2>&1 | tee "$out/pytest-gpu.log" | tail -15
# The shipped model does not fit the device tool's 64 MiB transfer beside the tree: a run
# without it sets SKIP_GEN=1.
[ -z "${SKIP_GEN:-}" ] || exit 0
prompt="The old man looked at the sea and said"
for mode in "--dense" "--sparse torch" "--sparse triton"; do
    set -- $mode
    backend=${2:-torch}
    cat > /tmp/backend.toml <<TOML
[model]
path = "$PWD/models/opt-gutenberg-31m"
[sparsity]
backend = "$backend"
TOML
    start=$(date +%s%N)
    timeout 120 python3 -c 'from dejavu.tools.cli import app; app(prog_name="dejavu-run")' \
        generate --config /tmp/backend.toml $1 --device "${DEVICE:-cuda}" \
        --dtype "${DTYPE:-float16}" --max-new-tokens 64 --prompt "$prompt" --json \
        > "$out/gen-${1#--}-$backend.json" 2>> "$out/gen.err"
    rc=$?
    echo "generate $1 backend=$backend rc=$rc wall=$(( ($(date +%s%N) - start) / 1000000 )) ms"
done
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text())["tokens"] for p in sorted(out.glob("gen-*.json"))
        if p.stat().st_size}
for name, tokens in runs.items():
    print(name, len(tokens), tokens[:12])
ref = runs.get("gen-sparse-torch")
if ref is not None and "gen-sparse-triton" in runs:
    same = sum(a == b for a, b in zip(ref, runs["gen-sparse-triton"]))
    print(f"sparse triton vs torch: {same}/{len(ref)} leading tokens equal")
PY
tail -5 "$out/gen.err" 2>/dev/null
