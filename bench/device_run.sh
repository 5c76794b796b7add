#!/usr/bin/env bash
# The serving benchmark on a lent GPU machine (no network): install the carried wheels, build the random
# Llama-2-7B-shaped model once, then run bench.serve. Usage, from the repository root on that machine:
#   bash bench/device_run.sh OUT_DIR [bench.serve arguments...]
# Needs .whl (../shared/tools/gpu-wheels.sh .whl, plus accelerate==1.15.0 and llguidance==1.9.1, the latter a
# cp39-abi3-manylinux_2_31 wheel: `pip download --no-deps --only-binary=:all: --python-version 3.12 --abi abi3
# --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1`) and .gpu/tokenizer (SmolLM2's tokenizer files).
set -euo pipefail
out=${1:?usage: device_run.sh OUT_DIR [args]}; shift
. "$(dirname "$0")/device_env.sh"  # wheels, path, the model in $model
# the cards' clocks, power and temperature every 200 ms beside the run (a clock that falls under load shows here)
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv -lms 200 > $out/clocks.csv 2>&1 &
clocks=$!
python3 -m bench.serve --model-dir $model "$@" 2>&1 | tee $out/serve.log
kill $clocks 2>/dev/null || true
