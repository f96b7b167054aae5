#!/usr/bin/env bash
# One prepared run for a lent GPU (see README "GPU checks"): the tests on CUDA (Triton compiled for real),
# then the GPU-size benchmarks. Logs and figures land in $OUT (the device tool brings them back).
#
#   device run:  bash scripts/gpu_session.sh            (optional: carry .whl with a liger-kernel wheel)
#
# Budget: about 10 minutes on an H100. Stages are time-boxed so a hang in one still returns the others.
set -uo pipefail
OUT="${OUT:-/tmp/ptk-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then  # peers (Liger-Kernel) carried as wheels: no network there
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  date -u
} 2>&1 | tee "$OUT/machine.txt"

# 0. The native extension with its CUDA part (pybind11, ninja and nvcc are on the GPU image; no network).
PTK_BUILD_CUDA=1 timeout 300 python3 setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log" | tail -5
python3 -c "import ptkernels as p; print('backends on cuda:', p.backends('cuda'))" 2>&1 | tee -a "$OUT/build.log"

# 1. Tests on the GPU (Triton kernels compiled, CUDA-only tests included). The AOT compile check, the
#    Hugging Face tests and the trainers' tests (CPU, tiny models, gloo) already run in CI; skip them here to save
#    device time (the GPU image need not have datasets / matplotlib either).
timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider \
  --ignore=tests/kernels/test_compile_gpu.py --ignore=tests/integrations --ignore=tests/trainers \
  2>&1 | tee "$OUT/tests.log" | tail -25

# 2. Benchmarks at the GPU sizes of DESIGN.md.
timeout 420 python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,min,rounds 2>&1 | tee "$OUT/bench.log" | tail -40
