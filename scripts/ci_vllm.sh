#!/usr/bin/env bash
# CI for the vLLM rollout engine: build (or reuse) its second environment, then run its tests there for real.
#
#   scripts/ci_vllm.sh [VENV_DIR]            (default: $VLLM_VENV or /work/venv-vllm)
#
# Called from .ci/run after the main suite. The tests run from the repository root, so `import ptkernels` is this
# checkout. Times on 2 shared CPU cores (load ~10): building the environment ~5.5 min the first time (PyPI
# downloads; a check of about a second after), the tests a few minutes (one vllm.LLM per module: ~20-30 s each;
# test_vllm_grpo.py's 3 GRPO steps ~70 s with the engine's build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VLLM_VENV:-/work/venv-vllm}}"
bash scripts/setup_vllm_venv.sh "$VENV"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# A test that is skipped here (vllm not importable) would hide a broken environment: fail on any skip.
out=$(mktemp)
# Only the vLLM tests: the rest of tests/trainers/rollout runs in the main suite.
SECONDS=0
"$VENV/bin/python" -m pytest tests/trainers/rollout/test_vllm_*.py -q -p no:cacheprovider -rs | tee "$out"
echo "ci_vllm: vLLM tests took ${SECONDS} s"
if grep -q "skipped" "$out"; then
    echo "ci_vllm: a vLLM test was skipped in the vLLM environment" >&2; exit 1
fi
