#!/usr/bin/env bash
# CI for the vLLM rollout engine: build (or reuse) its second environment, then run its tests there for real.
#
#   scripts/ci_vllm.sh [VENV_DIR]            (default: $VLLM_VENV or /work/venv-vllm)
#
# Called from .ci/run after the main suite. The tests run from the repository root, so `import ptkernels` is this
# checkout. Times on 2 shared CPU cores (load ~10): building the environment ~5.5 min the first time (PyPI
# downloads; a no-op check of a few seconds after), the tests ~2.5 min (one vllm.LLM per module: ~20-30 s each).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VLLM_VENV:-/work/venv-vllm}}"
bash scripts/setup_vllm_venv.sh "$VENV"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# A test that is skipped here (vllm not importable) would hide a broken environment: fail on any skip.
out=$(mktemp)
"$VENV/bin/python" -m pytest tests/trainers/rollout -q -p no:cacheprovider -rs | tee "$out"
if grep -q "skipped" "$out"; then
    echo "ci_vllm: a vLLM test was skipped in the vLLM environment" >&2; exit 1
fi
