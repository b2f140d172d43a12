#!/usr/bin/env bash
# The main job: install + build, then report what this machine runs and the
# benchmark table of every fused operator against eager PyTorch, diffusers and
# torch.compile. (The DDPM training/sampling demo joins here with the trainer.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
mkdir -p out
fastdiff bench --device auto --json out/bench.json "$@"
echo "benchmark results written to out/bench.json"
