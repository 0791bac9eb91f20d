#!/usr/bin/env bash
# Downloads bench/gpu_wheels.txt's wheels for the GPU machine (CPython 3.12, manylinux x86-64) into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 \
  manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  --platform any -d "${WHEEL_DIR:-.whl}" -r bench/gpu_wheels.txt
