#!/usr/bin/env bash
# The test suite: install + build (as scripts/setup_env.sh), then pytest.
# Without a GPU, GPU tests are skipped and Triton kernels run interpreted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest tests -q -p no:cacheprovider "$@"
