#!/usr/bin/env bash
# The test suite: install + build (as scripts/setup_env.sh), then pytest.
# Without a GPU, GPU tests are skipped and Triton kernels run interpreted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# two pytest-xdist workers (most tests run on one intra-op thread, so on a
# 2-core machine this cuts the suite from ~13 to ~8 min); FASTDIFF_TEST_WORKERS=0
# runs it in this process
python -m pytest tests -q -p no:cacheprovider -n "${FASTDIFF_TEST_WORKERS:-2}" "$@"
