# Sourced by the device scripts (bench/run_gpu.sh, bench/gpu_check.sh): installs the carried
# wheels (.whl/, made by ../shared/scripts/gpu-wheels.sh) and makes `dejavu` importable from this
# checkout without an install. The repository root is the dejavu package, so one link named
# `dejavu` to it, on PYTHONPATH, is the whole package (worker processes inherit PYTHONPATH).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
_dejavu_ns=$(mktemp -d)
ln -s "$PWD" "$_dejavu_ns/dejavu"
export PYTHONPATH="$_dejavu_ns${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
