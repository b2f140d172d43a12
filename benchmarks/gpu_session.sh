#!/usr/bin/env bash
# One lent-GPU session in one command: build, GPU tests, benchmarks.
# Run on the device machine from the repo root (the `device` tool), e.g.
#   bash benchmarks/gpu_session.sh [tests|bench|e2e|all]
# e2e: `fastdiff bench train` + `bench sample` at the issue's settings (bf16,
# channels_last; E2E_ARGS adds options, E2E_TIMEOUT bounds each suite).
# Writes logs and JSON under $OUT (or ./out when OUT is unset).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels carried for packages the image lacks (diffusers)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
FASTDIFF_CUDA_ARCH=${FASTDIFF_CUDA_ARCH:-9.0} MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import fastdiff; fastdiff.info()" 2>&1 | tee "$OUT/info.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$(date +%s)
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest tests -q -x -p no:cacheprovider --timeout=120 \
    -k "${TEST_FILTER:-not slow}" 2>&1 | tee "$OUT/tests.log" | tail -25
  echo "tests: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-300} python3 -m fastdiff bench --device cuda --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log" | tail -60
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = e2e ] || [ "$what" = all ]; then
  for suite in train sample; do
    t0=$(date +%s)
    timeout ${E2E_TIMEOUT:-500} python3 -m fastdiff bench "$suite" --device cuda --dtype bf16 --layout NHWC \
      --json "$OUT/e2e_gpu.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e_$suite.log" | tail -30
    echo "bench $suite: $(( $(date +%s) - t0 )) s"
  done
fi
