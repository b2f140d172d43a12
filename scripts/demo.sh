#!/usr/bin/env bash
# The main job, on a fresh machine: install + build, train a small DDPM on the
# bundled handwritten digits and one on the 2-D swiss roll (CPU: ~10 minutes
# together on 2 cores), sample from them, and print the benchmark tables.
# Outputs go to out/ (sample grids, loss curves, checkpoints, bench JSON).
#   DEMO_DIGITS_STEPS, DEMO_ROLL_STEPS   training steps (defaults below)
#   DEMO_BENCH=0                          skip the benchmark tables
# Extra arguments go to `fastdiff bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
mkdir -p out
DIGITS_STEPS=${DEMO_DIGITS_STEPS:-1500}
ROLL_STEPS=${DEMO_ROLL_STEPS:-3000}

echo "== training a DDPM on scikit-learn's digits (16x16, UNet preset digits-16, ${DIGITS_STEPS} steps)"
fastdiff train --dataset digits --preset digits-16 --steps "$DIGITS_STEPS" --batch 32 --lr 1e-3 --warmup 100 \
  --ema-decay 0.995 --log-every 100 --checkpoint-every 500 --num-samples 64 --sample-method ddim \
  --sample-steps 50 --out out/digits
echo "== 16 more digits with the full 1000-step ancestral sampler"
fastdiff sample --checkpoint out/digits --n 16 --method ddpm --out out/digits/samples_ddpm1000.png

echo "== training a DDPM on the 2-D swiss roll (MLP denoiser, ${ROLL_STEPS} steps)"
fastdiff train --dataset swissroll --steps "$ROLL_STEPS" --batch 256 --lr 1e-3 --warmup 100 --ema-decay 0.995 \
  --log-every 250 --checkpoint-every 1000 --num-samples 2000 --sample-steps 1000 --out out/swissroll

if [ "${DEMO_BENCH:-1}" != 0 ]; then
  echo "== benchmarks: every fused operator against eager PyTorch, diffusers and torch.compile"
  fastdiff bench --device auto --json out/bench.json "$@"
  echo "benchmark results written to out/bench.json"
fi
echo "== done. Look at:"
ls -1 out/digits/samples_*.png out/digits/loss.png out/swissroll/samples_*.png out/swissroll/loss.png
