#!/usr/bin/env bash
# The GPU measurements of issue #8 in one prepared script, for a device session with a few minutes
# of GPU time. Every figure lands in $OUT (default ./gpu_results) as it is measured, so a run cut
# short still returns what it finished.
#
#   bash benchmarks/gpu_suite.sh train    # sandwich step: bf16, then skip/remat/fp32/taps variants
#   bash benchmarks/gpu_suite.sh eval     # calibration + evaluation: A0/A6/max, masked vs static
#   bash benchmarks/gpu_suite.sh all
#   SUITE_SMALL=1 bash benchmarks/gpu_suite.sh all   # tiny settings: checks this script on CPU
#
# On the lent GPU machine (no ml_collections there): fetch the wheel here first with
#   bash benchmarks/gpu_wheels.sh
# and carry `.whl`; this script installs it into /tmp/site when it is present.
set -u
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
LOG=$OUT/suite.log
what=${1:-all}

if [ "${SUITE_SMALL:-0}" = 1 ]; then  # CPU check of the plumbing
  # --depthwise_impl=xla: what `auto` picks on a GPU (and the tiny programs compile ~2x faster than taps);
  # the shapes of tests/test_benchmarks.py, so the fp32 variant reuses the tests' compiled programs.
  TRAIN=(--space=tiny --batch_per_device=4 --steps=2 --image_size=16 --depthwise_impl=xla)
  EVAL=(--space tiny --batch 8 --batches 2 --image-size 16)
  SUBNETS=(max); T_TRAIN=300; T_EVAL=120
else
  TRAIN=(--space=alphanet --batch_per_device=256 --steps=30 --image_size=224)
  EVAL=(--space alphanet --batch 256 --batches 20 --image-size 224)
  SUBNETS=(a0 a6 max); T_TRAIN=240; T_EVAL=150
fi

run() {  # run SECONDS NAME CMD...: one measurement, its output appended to the log
  local secs=$1 name=$2; shift 2
  echo "### $name: $*" | tee -a "$LOG"
  timeout "$secs" "$@" 2>&1 | grep -v -e "^WARNING" -e "Warning:" | tee -a "$LOG"
  echo "### $name: exit ${PIPESTATUS[0]} after ${SECONDS}s of the suite" | tee -a "$LOG"
}

{ date -u; nvidia-smi -L 2>/dev/null; "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"; } \
  2>&1 | tee -a "$LOG"

if [ "$what" = train ] || [ "$what" = all ]; then
  # Highest priority first: the default recipe (bf16 on GPU), with a profile of 3 steps.
  run "$T_TRAIN" train_bf16 "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=bfloat16 --label=bf16 \
    --json="$OUT/train_bf16.json" --profile=/tmp/alphanet_profile --xla_stats
  run 60 profile_bf16 "$PY" benchmarks/profile_summary.py /tmp/alphanet_profile --top 40 > "$OUT/profile_bf16.txt"
  run "$T_TRAIN" train_bf16_skip "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=bfloat16 \
    --skip_inactive_blocks --label=bf16_skip --json="$OUT/train_bf16_skip.json"
  run "$T_TRAIN" train_bf16_remat "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=bfloat16 --remat \
    --label=bf16_remat --json="$OUT/train_bf16_remat.json"
  run "$T_TRAIN" train_fp32 "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=float32 --label=fp32 \
    --json="$OUT/train_fp32.json"
  run "$T_TRAIN" train_bf16_taps "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=bfloat16 \
    --depthwise_impl=taps --label=bf16_taps --json="$OUT/train_bf16_taps.json"
  # block_residuals='convs' (the CPU default): whether keeping only conv outputs pays on the GPU too.
  run "$T_TRAIN" train_bf16_convs "$PY" benchmarks/train_step.py "${TRAIN[@]}" --dtype=bfloat16 \
    --block_residuals=convs --label=bf16_convs --json="$OUT/train_bf16_convs.json"
fi

if [ "$what" = eval ] || [ "$what" = all ]; then
  for s in "${SUBNETS[@]}"; do
    for mode in masked static; do
      run "$T_EVAL" "eval_${s}_${mode}" "$PY" benchmarks/eval_throughput.py "${EVAL[@]}" --subnet "$s" \
        --mode "$mode" --dtype bfloat16 --json "$OUT/eval_${s}_${mode}.json"
    done
  done
fi
echo "### suite done in ${SECONDS}s" | tee -a "$LOG"
