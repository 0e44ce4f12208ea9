#!/usr/bin/env bash
# The GPU check, one prepared script for a machine with one GPU and no network (under 10 min):
# tokens/s and MFU of gpt_125m and gpt_350m in bf16 under ZeRO-1 and ZeRO-3, torch.compile
# on/off, the loader's share of step time, a bf16 export and generation from it (one table).
#
# Prepare here (with network), then carry .whl and data/bach to the GPU machine:
#   bench/gpu.sh --fetch        # wheels of what the GPU image lacks into .whl/ (Python 3.12)
#   python -m data_pipeline.prepare source=music21:bach output=data/bach
# There:
#   bash bench/gpu.sh [data/bach] [extra bench_gpu.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
# What mtrain needs beyond PyTorch, transformers and sentencepiece (already on GPU images).
PKGS=(deepspeed hydra-core omegaconf antlr4-python3-runtime webdataset miditok symusic
  torchdata wandb music21 fsspec s3fs psutil pebble py-cpuinfo hjson ninja pydantic msgpack)
if [[ "${1:-}" == "--fetch" ]]; then
  mkdir -p .whl
  for p in "${PKGS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$p" ||
      python3 -m pip wheel -q --no-deps -w .whl "$p"  # deepspeed is an sdist: a pure wheel
  done
  exit 0
fi
DATA=${1:-data/bach}
shift || true
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled DS_BUILD_OPS=0
GPU_NAME=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
export GPU_NAME
python3 bench/bench_gpu.py "$DATA" --out "${OUT:-/tmp/mtrain-gpu}" "$@"
