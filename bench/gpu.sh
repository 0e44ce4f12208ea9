#!/usr/bin/env bash
# The first GPU check: one prepared script for a machine with one GPU and no network (under 8
# minutes on one H100; bench/bench_gpu.py says what it runs). First it installs the carried
# wheels and checks that every requirement is met and mtrain imports, before any GPU work.
#
# Prepare here (with network), then carry .whl/ and the dataset to the GPU machine:
#   bench/gpu.sh --fetch    # exactly the wheels bench/gpu-wheels.txt locks, into .whl/
#   python -m data_pipeline.prepare source=music21:bach output=data/bach
# There (the table on stdout; JSON and logs in $OUT when set):
#   bash bench/gpu.sh [data/bach] [bench_gpu.py flags]
# The lock holds what the GPU image (Python 3.12, x86_64, CUDA torch) lacks, at CI's versions;
# bench/gpu_wheels.py makes it again after a dependency changes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch" ]]; then
  rm -rf .whl && mkdir -p .whl
  platforms=()
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  grep -v '^#' bench/gpu-wheels.txt | while read -r pin; do
    if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$pin" 2>/dev/null; then
      # Published as source only (antlr4-python3-runtime, deepspeed): built here, and only a
      # pure-Python wheel can serve another interpreter.
      built=$(mktemp -d)
      DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$built" "$pin"
      ls "$built"/*-none-any.whl >/dev/null 2>&1 || {
        echo "gpu.sh: $pin has no wheel for Python 3.12 and does not build as pure Python" >&2
        exit 1; }
      mv "$built"/*.whl .whl/ && rmdir "$built"
    fi
  done
  echo "gpu.sh: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1))"
  exit 0
fi
DATA=${1:-data/bach}
shift || true
export PYTHONPATH=$PWD
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled DS_BUILD_OPS=0
python3 bench/gpu_wheels.py check
python3 bench/bench_gpu.py "$DATA" "$@"
