#!/usr/bin/env bash
# The main job, on a fresh machine: install + build, train a small DDPM on the
# bundled handwritten digits (class-conditional: a guided grid with one row
# per class next to the unconditional samples) and one on the 2-D swiss roll (CPU: ~10 minutes
# together on 2 cores), sample from them, and print the benchmark tables.
# Outputs go to out/ (sample grids, loss curves, checkpoints, bench JSON).
#   DEMO_DIGITS_STEPS, DEMO_ROLL_STEPS   training steps (defaults below)
#   DEMO_GUIDANCE                         classifier-free guidance weight of the per-class digits grid (default 3)
#   DEMO_BENCH=0                          skip the benchmark tables
#   DEMO_BPD_IMAGES                       digits images for bits/dim (default 8, was 16 before the guided
#                                         grid was added, to keep the CPU time; 1000 model evaluations each)
#   DEMO_INCEPTION_WEIGHTS=PATH           also FID / IS / KID of the digits model (the standard file is
#                                         pt_inception-2015-12-05-6726825d.pth; see `fastdiff eval --help`)
#   DEMO_FID_SAMPLES                      samples for them (default 500; the convention is 50000)
# Extra arguments go to `fastdiff bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
mkdir -p out
DIGITS_STEPS=${DEMO_DIGITS_STEPS:-1500}
ROLL_STEPS=${DEMO_ROLL_STEPS:-3000}
GUIDANCE=${DEMO_GUIDANCE:-3}

echo "== training a class-conditional DDPM on scikit-learn's digits (16x16, UNet preset digits-16, ${DIGITS_STEPS} steps;"
echo "   labels dropped 10% of the time, so the same model is also the unconditional one)"
fastdiff train --dataset digits --preset digits-16 --class-conditional --cond-drop-prob 0.1 --steps "$DIGITS_STEPS" \
  --batch 32 --lr 1e-3 --warmup 100 --ema-decay 0.995 --log-every 100 --checkpoint-every 500 --num-samples 64 \
  --sample-method ddim --sample-steps 50 --out out/digits
echo "== classifier-free guidance: one row per class (guidance ${GUIDANCE}, fused into the DDIM step), next to"
echo "   the unconditional samples from the same noise"
fastdiff sample --checkpoint out/digits --class all --n 8 --guidance-scale "$GUIDANCE" --method ddim --steps 25 \
  --compare-unconditional --out out/digits/samples_guided.png
echo "== 16 more digits with the full 1000-step ancestral sampler"
fastdiff sample --checkpoint out/digits --n 16 --method ddpm --out out/digits/samples_ddpm1000.png
echo "== bits/dim of the digits model (the variational bound, 1000 terms per image)"
fastdiff eval --checkpoint out/digits --dataset digits --n "${DEMO_BPD_IMAGES:-8}" --batch 16 \
  --json out/digits/eval_bpd.json
if [ -n "${DEMO_INCEPTION_WEIGHTS:-}" ]; then
  echo "== FID / IS / KID of ${DEMO_FID_SAMPLES:-500} digits samples (DDIM, 50 steps) against the 1797 digits"
  fastdiff eval --checkpoint out/digits --dataset digits --no-bpd --fid --is --kid \
    --inception-weights "$DEMO_INCEPTION_WEIGHTS" --num-samples "${DEMO_FID_SAMPLES:-500}" --method ddim --steps 50 \
    --ref-stats out/digits/ref_stats_digits16.npz --json out/digits/eval_fid.json
else
  echo "   (FID / IS / KID: set DEMO_INCEPTION_WEIGHTS to the InceptionV3 weights file; see fastdiff eval --help)"
fi

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
