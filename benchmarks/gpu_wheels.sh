#!/usr/bin/env bash
# The wheels that must travel to the device machine for benchmarks/gpu.sh, into .whl/ (ignored by git; name it in
# the device call's `carry`). That machine has torch (2.11, CUDA 13), Triton, transformers, tokenizers, pyarrow,
# jinja2, pyyaml, rich, numpy and tensorboard, Python 3.12 and no package registry: what Anvil's trainer needs beyond
# those is pydantic; the benchmark adds Liger and torchtitan (for the comparison only, never a dependency of Anvil).
#
#   benchmarks/gpu_wheels.sh [--python-version 3.12]
#
# torchtitan 0.2.2 is the newest release that runs on torch 2.11 (0.3 wants a newer torch and more packages); only
# the packages its model and per-block compile import are carried. The total must stay under the 64 MiB a call may
# carry with the working tree: the script says the size and fails over 48 MiB.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

py=3.12
if [ "${1:-}" = "--python-version" ]; then py="$2"; fi
wheels=(
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
    "liger-kernel==0.8.5"
    "torchtitan==0.2.2" "torchdata==0.11.0" "tyro==1.0.17" "docstring-parser==0.18.0" "shtab==1.13.0"
    "typeguard==4.6.1"
)
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
size=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "${#wheels[@]} wheels, ${size} MiB in .whl/ (carry: [\".whl\"])"
if [ "$size" -gt 48 ]; then
    echo "benchmarks/gpu_wheels.sh: ${size} MiB is more than the 48 MiB this leaves for the carry" >&2
    exit 1
fi
