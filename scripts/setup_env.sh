#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds fastdiff
# in place. Idempotent: a second run only rebuilds what changed.
#   FASTDIFF_BUILD_CUDA=auto|0|1   build the CUDA kernels (auto: when nvcc is found)
#   FASTDIFF_CUDA_ARCH="9.0"       arch list (default 8.0;8.6;8.9;9.0+PTX with a GPU, 9.0 without)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, triton, numpy, ninja, pybind11, diffusers, transformers, hypothesis, scipy, pytest_benchmark, xdist, safetensors, PIL, matplotlib, sklearn, tqdm, importlinter, torchvision, torch_fidelity" 2>/dev/null; then
  echo "== installing dependencies (torch ~80 s)"
  python -m pip install -q "setuptools>=64" wheel
  python -m pip install -q "torch==2.14.1" triton numpy ninja pybind11 tqdm pillow safetensors \
    pytest pytest-benchmark pytest-xdist hypothesis scipy diffusers "transformers==5.24.0" expecttest matplotlib scikit-learn import-linter
  # FID / IS / KID: torch-fidelity, with the torchvision built for this torch (pinned so pip never swaps torch)
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "torch-fidelity==0.4.0"
fi
echo "== building fastdiff (C++ CPU kernels; CUDA kernels when a toolkit is found)"
if [ -z "${FASTDIFF_CUDA_ARCH:-}${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  # no GPU here: the CUDA kernels are only compile-checked, one arch is enough
  # (4x faster than the default list; set FASTDIFF_CUDA_ARCH to build others)
  export FASTDIFF_CUDA_ARCH="9.0"
  echo "   no GPU visible: CUDA kernels compiled for sm_90 only (FASTDIFF_CUDA_ARCH overrides)"
fi
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
python -c "import fastdiff; fastdiff.info()"
