#!/usr/bin/env bash
# The streaming projection kernels on one lent GPU (issue 8), no server: bench.gemv's sweep of launch shapes
# against cuBLAS for the Llama-2-7B projections at TP 1, 2 and 4 (shard shapes), then the compiled decode step
# with the kernels and with TPSERVE_GEMV=cublas (bench.tp_step, one rank: replay times and kernels), then
# bench.loop_time's batch-1 loop and the 64-stream workload in process (GPU time per step kind).
# Usage, from the repository root on that machine (wheels in .whl, tokenizer in .gpu, as device_run.sh):
#   bash bench/device_gemv.sh OUT_DIR
set -uo pipefail
out=${1:?usage: device_gemv.sh OUT_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 330 python3 -m bench.gemv --tp 1 --tp 2 --tp 4 --rows 1 --rows 4 --rows 16 --sweep --out "$out/gemv_sweep.json" \
  2>&1 | grep -v '^ ' | tail -45
timeout 60 python3 -m bench.gemv --tp 1 --rows 1 --rows 8 --rows 64 --out "$out/gemv_rows.json" 2>&1 | grep "rows"
timeout 60 python3 -m bench.gemv --tp 1 --rows 1 --rows 4 --dtype bf16 --out "$out/gemv_bf16.json" 2>&1 | grep "rows"
model=/tmp/tpserve-gpu/llama7b
[ -f $model/config.json ] || python3 -c "from pathlib import Path; from bench.gpu_tp import build_model; build_model(Path('$model'), Path('.gpu/tokenizer'))"
for gemv in triton cublas; do
  TPSERVE_GEMV=$gemv timeout 150 python3 -m torch.distributed.run --nproc-per-node 1 -m bench.tp_step --model-dir $model \
    --rows 1 --rows 4 --rows 64 --out "$out/tp_step_$gemv.json" 2>&1 | grep -v "^\[" | grep -iv warn | tail -40
done
timeout 200 python3 -m bench.loop_time --model-dir $model --rows 1 --mixed 64 --out "$out/loop_time.json" 2>&1 \
  | grep -v "^\[" | tail -60
