#!/usr/bin/env bash
# Download here, into .whl/ (ignored by git), the wheels scripts/gpu_check.sh installs on the GPU machine: the
# Python packages this project needs that its image lacks (datasets, and dill and multiprocess that datasets
# needs; the rest -- torch, numpy, tokenizers, pyarrow, pandas, fsspec, xxhash, huggingface-hub, tensorboard --
# is there). The versions are this machine's, the ones the tests run with; the wheels are for the device's
# Python 3.12 on x86-64 Linux. Under 1 MB in all.
#   bash scripts/gpu_wheels.sh && ls .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=$("$PY" -c 'import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("datasets", "dill", "multiprocess")))')
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PINS
ls -l .whl
