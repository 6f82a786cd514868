#!/usr/bin/env bash
# The GPU machine's one check (no network, no pip): GPU-only tests, then a
# trimmed benchmark printed as tables. Under 4 minutes on one H100/H200.
#
#   PYTHONPATH=. bash bench/gpu_check.sh          # on the GPU machine, from the repo root
#   PYTHONPATH=. bash bench/gpu_check.sh --dry    # anywhere: CPU, tiny sets, checks the plumbing
#
# Exit status: nonzero when a GPU test or a benchmark failed (or timed out).
# Writes presam_bench_gpu*.json (and RESULTS.md with the GPU section filled in,
# RESULTS_traffic_gpu.md with the traffic tables) to $OUT when set, else to ${TMPDIR:-/tmp}; bench/report.py turns the JSON
# into bench/RESULTS.md's GPU section back home.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
DEST="${OUT:-${TMPDIR:-/tmp}}"
mkdir -p "$DEST"
JSON_MAIN="$DEST/presam_bench_gpu.json"
JSON_COMPILED="$DEST/presam_bench_gpu_compiled.json"
JSON_TRAFFIC="$DEST/presam_bench_gpu_traffic.json"
status=0
fail() { [[ $status -eq 0 ]] && status=$1; }
start=$SECONDS

echo "== 1. GPU-only tests: pytest -m gpu tests (Inductor compiles included)"
timeout 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
rc=$?
case $rc in
  0) ;;
  5) echo "(no tests marked gpu were collected)" ;;
  124) echo "GPU tests TIMED OUT"; fail 124 ;;
  *) echo "GPU tests FAILED (pytest exit $rc)"; fail "$rc" ;;
esac

echo "== 1b. FSDP2 with NCCL (only with more than one GPU)"
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ $DRY -eq 0 && "$gpus" -gt 1 ]]; then
  timeout 60 "$PY" -m torch.distributed.run --nproc_per_node 2 examples/fsdp_train.py --cuda --steps 10 \
    || { echo "FSDP2/NCCL example FAILED"; fail 4; }
else
  echo "(skipped: $gpus GPU(s))"
fi

if [[ $DRY -eq 1 ]]; then
  export PRESAM_BENCH_SMOKE=1 PRESAM_BENCH_DEVICE=cpu
else
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --dry")' || exit 2
  export PRESAM_BENCH_ROUNDS=10 PRESAM_BENCH_DTYPES=fp32,bf16 PRESAM_BENCH_KERNEL_SIZES=1M,16M,256M
fi

echo "== 2. benchmark: ResNet-50 and GPT-2 medium sets, SAM/ASAM/InfoSAM, kernel table"
PRESAM_BENCH_SETS=resnet50,gpt2_medium PRESAM_BENCH_COMPILED=none \
  timeout 150 "$PY" -m pytest -q bench/test_step_overhead.py --benchmark-only \
  --benchmark-json="$JSON_MAIN" -p no:cacheprovider --benchmark-columns=median,iqr,rounds
rc=$?
[[ $rc -ne 0 ]] && { echo "benchmark FAILED (pytest exit $rc)"; fail "$rc"; }

echo "== 3. the compiled loop (torch.compile), ResNet-50 set, SAM fp32"
PRESAM_BENCH_SETS=resnet50 PRESAM_BENCH_DTYPES=fp32 PRESAM_BENCH_COMPILED=resnet50/fp32/sam \
  timeout 100 "$PY" -m pytest -q bench/test_step_overhead.py --benchmark-only -k "fp32-sam-fresh-loop or fp32-sam-kept-loop" \
  --benchmark-json="$JSON_COMPILED" -p no:cacheprovider --benchmark-columns=median,iqr,rounds
rc=$?
[[ $rc -ne 0 ]] && { echo "compiled-loop benchmark FAILED (pytest exit $rc)"; fail "$rc"; }

echo "== 3b. traffic modes (issue 7): GPT-2 medium fp32, in place / out of place / fused, and perturb=auto's crossover"
PRESAM_BENCH_SETS=gpt2_medium PRESAM_BENCH_DTYPES=fp32 PRESAM_BENCH_ROUNDS=5 \
  timeout 120 "$PY" -m pytest -q bench/test_traffic_modes.py --benchmark-only -k "traffic_modes or auto_crossover" \
  --benchmark-json="$JSON_TRAFFIC" -p no:cacheprovider --benchmark-columns=median,iqr,rounds
rc=$?
[[ $rc -ne 0 ]] && { echo "traffic benchmark FAILED (pytest exit $rc)"; fail "$rc"; }
if [[ -s "$JSON_TRAFFIC" ]]; then
  "$PY" bench/test_traffic_modes.py "$JSON_TRAFFIC" | tee "$DEST/RESULTS_traffic_gpu.md" || fail 3
fi

echo "== 4. tables"
jsons=()
for j in "$JSON_MAIN" "$JSON_COMPILED"; do [[ -s "$j" ]] && jsons+=("$j"); done
if [[ ${#jsons[@]} -gt 0 ]]; then
  if [[ $DRY -eq 1 ]]; then
    "$PY" bench/report.py "${jsons[@]}" --print --no-write || fail 3
  else
    "$PY" bench/report.py "${jsons[@]}" --print --out "$DEST/RESULTS.md" || fail 3
  fi
else
  echo "no benchmark JSON was written"; fail 3
fi
echo "== done in $((SECONDS - start)) s, exit status $status"
exit $status
