#!/usr/bin/env bash
# Tensor parallelism's pieces on a lent multi-GPU machine (issue 13), no server: the one-shot all-reduce against
# NCCL (bench.allreduce), then the compiled decode step per TP (bench.tp_step: replay times, kernels, logits on
# seeded inputs compared across TP), at TP=4 also with TPSERVE_ALLREDUCE=nccl for the same-run A/B.
# Usage, from the repository root on that machine (wheels in .whl, tokenizer in .gpu, as device_run.sh):
#   bash bench/device_tp.sh OUT_DIR [TP ...]      (default TPs: 4 2 1)
set -uo pipefail
out=${1:?usage: device_tp.sh OUT_DIR [TP ...]}; shift
tps=${*:-4 2 1}
. "$(dirname "$0")/device_env.sh"  # wheels, path, the model in $model
run() { local n=$1; shift; timeout 240 python3 -m torch.distributed.run --nproc-per-node "$n" "$@"; echo "rc=$? ($n ranks: $*)"; }
for n in $tps; do [ "$n" -gt 1 ] && run "$n" -m bench.allreduce --out "$out/allreduce_tp$n.json" 2>&1 | tail -60; done
logits=()
for n in $tps; do
  run "$n" -m bench.tp_step --model-dir $model --out "$out/tp_step_tp$n.json" --logits "/tmp/logits_tp$n.pt" 2>&1 | grep -v "^\[" | tail -50
  logits+=("/tmp/logits_tp$n.pt")
  if [ "$n" -eq 4 ]; then
    TPSERVE_ALLREDUCE=nccl run 4 -m bench.tp_step --model-dir $model --out "$out/tp_step_tp4_nccl.json" 2>&1 | grep -v "^\[" | tail -30
  fi
done
python3 -m bench.tp_step --compare $(ls /tmp/logits_tp*.pt) | tee "$out/logits_compare.json"
