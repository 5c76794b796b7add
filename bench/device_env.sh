# Sourced by the bench/device_*.sh scripts on a lent GPU machine (no network), from the repository root: installs
# the carried wheels (.whl) into /tmp/site, puts them and the repository on the path, names the cards, and builds
# the random Llama-2-7B-shaped model once into $model (SmolLM2's tokenizer files from .gpu/tokenizer).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
model=/tmp/tpserve-gpu/llama7b
[ -f $model/config.json ] || python3 -c "from pathlib import Path; from bench.gpu_tp import build_model; build_model(Path('$model'), Path('.gpu/tokenizer'))"
