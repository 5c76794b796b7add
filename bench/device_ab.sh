#!/usr/bin/env bash
# Same-run A/B of the decode step's switches on a lent 2-GPU machine (issue 8), no server: bench.tp_step (replay
# times, GPU time and kernel count by family, seeded logits) at TP=1 and TP=2 with programmatic dependent launch
# off and on (TPSERVE_PDL) and, at TP=2, the all-reduce joined to the residual add and norm off and on
# (TPSERVE_FUSED_RESIDUAL); meanwhile bench.loop_time's 64-stream workload in process on the second GPU. Then every
# variant's logits against TP=1's.
# Usage, from the repository root on that machine (wheels in .whl, tokenizer in .gpu, as device_run.sh):
#   bash bench/device_ab.sh OUT_DIR        (QUICK=1: TP=1 with PDL, TP=2 with neither and with both, only)
set -uo pipefail
out=${1:?usage: device_ab.sh OUT_DIR}
. "$(dirname "$0")/device_env.sh"  # wheels, path, the model in $model
step() {  # TP NAME [ENV=VALUE ...]
  local n=$1 name=$2; shift 2
  env "$@" timeout 200 python3 -m torch.distributed.run --nproc-per-node "$n" --master-port $((29500 + n)) \
    -m bench.tp_step --model-dir $model --rows 1 --rows 64 --out "$out/tp_step_tp${n}_$name.json" \
    --logits "/tmp/logits_tp${n}_$name.pt" 2>&1 | grep -v "^\[" | grep -iv warn | tail -4
  echo "rc=$? tp=$n $name"
}
CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m bench.loop_time --model-dir $model --rows 1 --mixed 64 \
  --out "$out/loop_time.json" > "$out/loop_time.log" 2>&1 &
loop=$!
CUDA_VISIBLE_DEVICES=0 step 1 pdl
[ "${QUICK:-0}" = 1 ] || CUDA_VISIBLE_DEVICES=0 step 1 plain TPSERVE_PDL=0
wait $loop; echo "loop_time rc=$?"; grep -v "^\[" "$out/loop_time.log" | tail -40
step 2 plain TPSERVE_PDL=0 TPSERVE_FUSED_RESIDUAL=0
[ "${QUICK:-0}" = 1 ] || step 2 fused TPSERVE_PDL=0
step 2 both
python3 -m bench.tp_step --compare /tmp/logits_tp1_pdl.pt $(ls /tmp/logits_tp1_plain.pt 2>/dev/null) /tmp/logits_tp2_*.pt \
  | tee "$out/logits_compare.json"
python3 - "$out" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("tp_step_*.json")):
    r = json.loads(path.read_text())
    for rows in ("rows_1", "rows_64"):
        k = r[rows]["kernels"]
        print(path.stem, rows, r[rows]["replay_ms"], "ms", k["total_kernels"], "kernels", json.dumps(k["us"])[:400])
EOF
