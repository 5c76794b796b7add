#!/usr/bin/env bash
# The decode step's own kernels on one lent GPU (issue 8), no server: bench.gemv (the streaming projections
# against cuBLAS for the Llama-2-7B projections at TP 1, 2 and 4 shard shapes; SWEEP=1 tries every launch
# shape), then the compiled decode step of one rank (bench.tp_step: replay times, GPU time by kernel family,
# logits) with tpserve's kernels and with cuBLAS and flash attention instead (TPSERVE_GEMV=cublas
# TPSERVE_DECODE_ATTENTION=flash), then bench.loop_time's batch-1 loop and the 64-stream workload in process.
# Usage, from the repository root on that machine (wheels in .whl, tokenizer in .gpu, as device_run.sh):
#   bash bench/device_step.sh OUT_DIR
set -uo pipefail
out=${1:?usage: device_step.sh OUT_DIR}
. "$(dirname "$0")/device_env.sh"  # wheels, path, the model in $model
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 330 python3 -m bench.gemv --tp 1 --tp 2 --tp 4 --rows 1 --rows 4 --rows 16 --sweep --out "$out/gemv_sweep.json" \
    2>&1 | grep "rows"
else
  timeout 120 python3 -m bench.gemv --tp 1 --tp 2 --tp 4 --rows 1 --rows 4 --out "$out/gemv.json" 2>&1 | grep "rows"
fi
step() {  # NAME, then environment assignments
  local name=$1; shift
  env "$@" timeout 150 python3 -m torch.distributed.run --nproc-per-node 1 -m bench.tp_step --model-dir $model \
    --rows 1 --rows 64 --out "$out/tp_step_$name.json" --logits "/tmp/logits_$name.pt" 2>&1 | grep -v "^\[" \
    | grep -iv warn | tail -30
}
step tpserve TPSERVE_GEMV= TPSERVE_DECODE_ATTENTION=
step libraries TPSERVE_GEMV=cublas TPSERVE_DECODE_ATTENTION=flash
python3 -m bench.tp_step --compare /tmp/logits_libraries.pt /tmp/logits_tpserve.pt | tee "$out/logits_compare.json"
timeout 200 python3 -m bench.loop_time --model-dir $model --rows 1 --mixed 64 --out "$out/loop_time.json" 2>&1 \
  | grep -v "^\[" | tail -60
