#!/usr/bin/env bash
# Download, on a machine with package access, the wheels that the GPU image
# lacks into the git-ignored .whl/, for CPython 3.12 on manylinux x86-64.
# benchmarks/gpu_check.sh (and gpu_session.sh) install them from there with
# `pip install --no-index --no-deps`, since the GPU machine has no network.
#
#   bash scripts/gpu_wheels.sh                 # diffusers and what the image lacks
#   PACKAGES="diffusers==0.42.1" bash scripts/gpu_wheels.sh
#
# The GPU image has torch 2.11 (cu130), triton 3.6, numpy, pytest and their
# dependencies; it lacks diffusers. diffusers' own dependencies are listed
# below except those the image already has (torch is never downloaded:
# --no-deps, with the list written out). Only binary wheels are taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
PYVER=${GPU_PYVER:-312}
# diffusers and its runtime requirements (importlib_metadata, huggingface-hub,
# safetensors, regex, requests, filelock, Pillow) plus huggingface-hub's;
# pytest-timeout and hypothesis for the test suite
PACKAGES=${PACKAGES:-"diffusers huggingface-hub safetensors regex requests urllib3 idna certifi charset-normalizer
  filelock fsspec tqdm pyyaml packaging typing-extensions importlib-metadata zipp pillow hf-xet
  hypothesis sortedcontainers attrs pytest-timeout expecttest scipy scikit-learn joblib threadpoolctl matplotlib
  contourpy cycler fonttools kiwisolver pyparsing python-dateutil six"}
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download --only-binary=:all: --no-deps --dest "$DEST" \
  --python-version "$PYVER" --implementation cp --abi "cp$PYVER" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any $PACKAGES
echo "wheels in $DEST/: $(ls "$DEST"/*.whl | wc -l) ($(du -sh "$DEST" | cut -f1)); .whl/ is git-ignored"
ls "$DEST"
