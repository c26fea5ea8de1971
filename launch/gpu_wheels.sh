#!/usr/bin/env bash
# Fill a folder (default .whl/, git-ignored) with the wheels a GPU machine without network lacks,
# for Python 3.12 on x86-64 Linux, so that `make gpu-check` can install them there offline.
#   launch/gpu_wheels.sh [DIR]          (make gpu-wheels; needs the package registry and .venv)
#
# What the GPU machine has (this workplace's H200 image: Python 3.12, torch 2.11 + CUDA 13,
# transformers, safetensors, tqdm, matplotlib, pyarrow, pandas, mpi4py, pytest, ninja, nvcc, ...)
# is used as it is: its own CUDA torch in particular, never ours. What it lacks is DeepSpeed and
# its pydantic/hjson, and datasets with the two of its needs the image does not hold. The versions
# are the ones .venv holds, so the GPU runs the code CI tested.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || { echo "gpu_wheels.sh: $PIP not found; run make test or make train first to create .venv" >&2; exit 2; }
version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
PACKAGES=(hjson pydantic pydantic_core annotated-types typing-inspection datasets dill multiprocess)
rm -rf "$DIR"
mkdir -p "$DIR"
pins=()
for name in deepspeed "${PACKAGES[@]}"; do
  v=$(version "$name")
  [ -n "$v" ] || { echo "gpu_wheels.sh: $name is not installed in .venv" >&2; exit 2; }
  pins+=("$name==$v")
done
# DeepSpeed ships only as a source distribution; its wheel is pure Python (py3-none-any): the
# CUDA ops are JIT-built on the GPU machine with its nvcc at first use.
"$PIP" wheel -q --no-deps -w "$DIR" "${pins[0]}"
# Every manylinux level the machine's glibc takes: pip matches a wheel's tag exactly.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DIR" "${pins[@]:1}"
ls "$DIR"
echo "gpu_wheels.sh: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
