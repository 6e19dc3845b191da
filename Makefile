# `make demo`: set up (first time) and run the main job on the embedded default.
# `make test`: set up (first time) and run the tests.
VENV ?= .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench

install:
	scripts/install.sh

demo: install
	$(VENV)/bin/vllm-plugin demo

test: install
	$(VENV)/bin/python -m pytest -q tests

bench: install
	$(VENV)/bin/python -m benchmarks.pipeline
