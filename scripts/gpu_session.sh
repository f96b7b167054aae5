#!/usr/bin/env bash
# One prepared run for a lent GPU (see README, "GPU checks"): build the native extension with its CUDA part, the
# GPU-size benchmarks of linear_cross_entropy / token log-probs (issue 2's GPU targets), the tests on CUDA (Triton
# compiled for real), QLoRA on CUDA, the DPO and GRPO benchmarks, LoRA's memory, the trainers' tests. Logs and
# figures land in $OUT; where they are more than the 8 files the device tool brings back, all but session.log are
# packed into one archive, ptk-gpu.tgz.
#
#   device run:  bash scripts/gpu_session.sh     (carry .whl holding wheels of the peers and of bitsandbytes:
#                liger-kernel and cut-cross-entropy are benchmarked, bitsandbytes runs QLoRA; none is on the image)
#
# The build reads pyproject.toml, whose SPDX license string needs setuptools >= 77: the session log prints the
# image's; if it is older, carry a setuptools wheel in .whl too (the carried wheels come first on PYTHONPATH).
#
# PTK_GPU_STAGES says which stages run (default "build tests qlora bench_lce bench_rl compact_blocks bench_lora
# trainers bench_vllm"); PTK_CHUNK_SWEEP=0 leaves the chunk-size sweep out of bench_lce. The whole run ends within
# PTK_GPU_BUDGET_S seconds (default 560): every stage is time-boxed to its own limit and to what is left, so a
# hang in one still returns the others' logs. Stages run one after another, never two at a time on the GPU, so
# the timings are undisturbed.
#
# Stage times on the H200 (2026-12-04): build 20 s, tests 70 s, qlora 30 s, bench_lce 80 s (PTK_CHUNK_SWEEP=0),
# bench_rl 95 s, bench_lora ~35 s per case (6 cases, plus ~20 s to write the model), trainers 100-150 s (252
# tests in its first 36 s). All of them pass one call's 600 s: with 15 device-minutes, split them into two calls,
# e.g. PTK_GPU_STAGES="build tests qlora bench_lce bench_rl" then "build compact_blocks trainers bench_lora".
# compact_blocks (memory="compact" over 12 block shapes, issue 26 item 5) has not run on a GPU yet: limit 120 s.
set -uo pipefail
OUT="${OUT:-/tmp/ptk-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + ${PTK_GPU_BUDGET_S:-560}))
SUMMARY="$OUT/session.log"

STAGES=" ${PTK_GPU_STAGES:-build tests qlora bench_lce bench_rl compact_blocks bench_lora trainers bench_vllm} "
SWEEP=(--chunk-sweep)
[[ "${PTK_CHUNK_SWEEP:-1}" == 0 ]] && SWEEP=()

# stage NAME LIMIT CMD...: runs CMD with its output in $OUT/NAME.log, for at most LIMIT seconds and never past
# the deadline; a one-line result goes to session.log.
stage() {
  local name=$1 limit=$2 t0 left rc
  shift 2
  [[ "$STAGES" == *" $name "* ]] || return 0
  t0=$(date +%s)
  left=$((DEADLINE - t0))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s left" | tee -a "$SUMMARY"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at +$((t0 - START))s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc after $(($(date +%s) - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')" \
    | tee -a "$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, torch, triton, setuptools; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| setuptools', setuptools.__version__, '|',
torch.cuda.get_device_name())"
  nproc
  date -u
} 2>&1 | tee "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then # peers (Liger-Kernel) carried as wheels: no network there
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH" && echo "carried wheels: $(ls .whl)" | tee -a "$SUMMARY"
fi

# 1. The native extension with its CUDA part, for sm_90 only (pybind11, ninja and nvcc are on the GPU image).
stage build 150 bash -c 'PTK_BUILD_CUDA=1 PTK_CUDA_ARCHS=90 MAX_JOBS="$(nproc)" python3 setup.py build_ext --inplace \
  && python3 -c "import ptkernels as p; from ptkernels.ops.core.dispatch import unusable_reason as u
print(\"backends on cuda:\", p.backends(\"cuda\"), \"| native:\", u(\"native\", \"cuda\") or \"usable\")"'
[[ -f "$OUT/build.log" ]] && tail -3 "$OUT/build.log" | tee -a "$SUMMARY"

# 2. The tests on CUDA (every Triton kernel compiled for sm_90, the CUDA-only tests). The AOT compile checks and the
#    Hugging Face tests run on CPU in CI (nothing there takes a GPU); the trainers' tests are stages 3 and 7.
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 12)
python3 -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout=120)
stage tests 120 python3 -m pytest tests -q -p no:cacheprovider -rfE "${parallel[@]}" \
  --ignore=tests/tools/test_aot_compile.py --ignore=tests/ops/backends/test_cuda_compile.py \
  --ignore=tests/integrations --ignore=tests/trainers

# 3. QLoRA on CUDA (bitsandbytes carried as a wheel): DPO with a live reference on a 4-bit and an 8-bit base, GRPO
#    (beta 0.1, the built-in rollout engine) on a 4-bit one.
stage qlora 90 python3 -m pytest tests/trainers/test_lora.py -v -p no:cacheprovider -rfEs -k qlora

# 4. Issue 2's GPU size (N=8192, 25% masked, D=4096, V=128256, bf16): every implementation (the chunk-size sweep
#    too unless PTK_CHUNK_SWEEP=0), and the round-robin that gives ratios measured side by side.
stage bench_lce 200 env PTK_BENCH_ROUNDS=10 python3 -m pytest benchmarks/test_bench_linear_cross_entropy.py \
  --benchmark-only --interleaved "${SWEEP[@]}" -q -p no:cacheprovider --benchmark-json="$OUT/bench_lce.json" \
  --benchmark-columns=median,min,rounds
# memory="compact" (issue 26 item 5) is among bench_lce's and bench_rl's cases (ptk-triton+compact): its peak
# against the dX + dW floor (target <= 1.2x) and its share of the matmul rate (target >= 75%; it does 4 GEMMs of
# work for 3 useful), beside the default path and token log-probs with every chunk's logits kept (+keep, item 6).
compact_check() {
  python3 - "$1" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
rows = [b["extra_info"] for b in json.load(open(sys.argv[1]))["benchmarks"]
        if b.get("extra_info", {}).get("impl", "").startswith(("ptk-triton", "cce", "liger"))
        and "grad_floor_bytes" in b["extra_info"]]
for r in sorted(rows, key=lambda r: (r["op"], r["impl"])):
    share = 1.0 / r["time_over_floor"] if r.get("time_over_floor") else float("nan")
    print(f"compact check: {r['op']:22s} {r['impl']:20s} peak {r.get('peak_mem_mib', float('nan')):8.1f} MiB = "
          f"{r.get('mem_x_grad_floor', float('nan')):.2f}x dX+dW ({r['grad_floor_bytes'] / 2**20:.0f} MiB), "
          f"median {r.get('median_s', float('nan')) * 1e3:.1f} ms, {share:.0%} of the matmul rate")
PY
}
if [[ "$STAGES" == *" bench_lce "* && -f "$OUT/bench_lce.json" ]]; then
  compact_check "$OUT/bench_lce.json"
fi

# 5. DPO (4 pairs x T=1024) and GRPO (8 x T=1024) at D=4096, V=128256, bf16.
stage bench_rl 150 env PTK_BENCH_ROUNDS=10 python3 -m pytest benchmarks/test_bench_grpo.py \
  benchmarks/test_bench_preference.py --benchmark-only --interleaved -q -p no:cacheprovider \
  --benchmark-json="$OUT/bench_rl.json" --benchmark-columns=median,min,rounds
if [[ "$STAGES" == *" bench_rl "* && -f "$OUT/bench_rl.json" ]]; then
  compact_check "$OUT/bench_rl.json"  # the fused DPO and GRPO ops' memory="compact" beside their default path
fi

# 5b. memory="compact"'s block shape (benchmarks/test_bench_compact_blocks.py): time as a share of the matmul rate
#     (the 3 useful GEMMs' rate; 4 GEMMs cap it at 75%, the target) and peak over dX + dW (target <= 1.2)
#     for accumulator sizes 16-128 MiB x 2^23-2^25 logits per tile; the best shape goes into vocab_blocks.py.
stage compact_blocks 120 env PTK_BENCH_ROUNDS=5 python3 -m pytest benchmarks/test_bench_compact_blocks.py \
  --benchmark-only --compact-blocks -q -p no:cacheprovider --benchmark-json="$OUT/compact_blocks.json" \
  --benchmark-columns=median,min,rounds
if [[ -f "$OUT/compact_blocks.json" ]]; then
  python3 - "$OUT/compact_blocks.json" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(f"compact blocks: {e['vocab_block']:6d} columns x {e['rows_per_tile']:5d} rows, median "
          f"{e['median_s'] * 1e3:7.1f} ms, {e['share_of_matmul_rate']:.0%} of the matmul rate, "
          f"{e.get('mem_x_grad_floor', float('nan')):.2f}x dX+dW")
PY
fi

# 6. LoRA and QLoRA vs full fine-tuning: peak memory and step time of ptk dpo (live reference) and ptk grpo (beta
#    0.1) on a random ~0.6B Llama (benchmarks/test_bench_lora.py, PTK_LORA_BENCH=gpu): the reference copy gone shows
#    as memory, the 4-bit base too.
stage bench_lora 200 env PTK_LORA_BENCH=gpu python3 -m pytest benchmarks/test_bench_lora.py --benchmark-only -q -s \
  -p no:cacheprovider -rs --benchmark-json="$OUT/bench_lora.json" --benchmark-columns=median,rounds
if [[ -f "$OUT/bench_lora.json" ]]; then
  python3 - "$OUT/bench_lora.json" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(f"lora check: {e['stage']:5s} {e['lora']:6s} peak {e['peak_mib']:9.1f} MiB, median step {e['step_s']:.3f} s, "
          f"{e['trainable_params']:,} trainable of {e['params']:,}")
PY
fi

# 7. The trainers' tests on CUDA (the stages take the GPU and bf16 autocast there), less the two-process ones (one
#    GPU here: NCCL wants one per rank) and those that need `datasets` (not on the GPU image).
#    -v and a 60-s limit per test: the log names each result as it lands, so a stage cut short by its box still
#    says what failed (the first try, 2026-11-30, ran out at 144 s with one failure it never got to name).
trainer_parallel=("${parallel[@]/--timeout=120/--timeout=60}")
stage trainers 240 python3 -m pytest tests/trainers -v -p no:cacheprovider -rfE "${trainer_parallel[@]}" \
  -k "not two_processes and not dataset"

# 8. Rollout tokens/s of the vLLM engine beside kv_cache and hf (small preset, 64 prompts x 64 new tokens), where the
#    image has vllm (no network there: it cannot be installed on the spot); skipped with a line in session.log
#    otherwise.
if python3 -c "import vllm" >/dev/null 2>&1; then
  stage bench_vllm 150 env PTK_BENCH_PRESET=small PTK_BENCH_ROUNDS=5 python3 -m pytest \
    benchmarks/test_bench_vllm_rollout.py --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,min,rounds
elif [[ "$STAGES" == *" bench_vllm "* ]]; then
  echo "== bench_vllm: skipped, vllm is not importable here" | tee -a "$SUMMARY"
fi

# The reply shows the end of the output: the tests' verdict and the benchmarks' summary tables last.
for name in bench_vllm trainers bench_lora compact_blocks qlora tests bench_rl bench_lce; do
  echo "################ $name"
  [[ -f "$OUT/$name.log" ]] && grep -E "passed|failed|error|crashed|FAILED|^ERROR|^\| |^=+ ptkernels" \
    "$OUT/$name.log" | grep -v "^|---" | tail -n 45
done
# The device tool brings back at most 8 files: past that, everything but session.log goes into one archive.
if (($(find "$OUT" -maxdepth 1 -type f | wc -l) > 8)); then
  (cd "$OUT" && tar czf ptk-gpu.tgz --exclude=session.log --exclude=ptk-gpu.tgz -- * \
    && find . -maxdepth 1 -type f ! -name session.log ! -name ptk-gpu.tgz -delete)
fi
cat "$SUMMARY"
