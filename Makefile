# finetune: common jobs. Everything runs from the repository root, so `make ui` sees every
# run in ./mlflow.db. `make demo` and `make test` work on a fresh clone: they create the
# virtual environment when it is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= tiny-demo
ARGS   ?=
PORT   ?= 5000
# The CPU wheel here, the CUDA build on a GPU machine: same pin, pip picks the right one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

GPUS   ?= 2
# The newest adapter under outputs/ unless ADAPTER=... is given.
ADAPTER ?= $(shell ls -td outputs/*/*/adapter outputs/*/*/*/adapter 2>/dev/null | head -1)
RUN_DIR = outputs/$(RECIPE)/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: help install demo test preflight train train-multi merge chat ui lint bench bench-gpu clean

help:
	@echo "make install                 create $(VENV) (if missing) and install finetune with its dev tools"
	@echo "make demo                    fine-tune the tiny demo model on the CPU (data, preflight, QLoRA, eval, MLflow)"
	@echo "make test                    run the test suite (CPU only, no network)"
	@echo "make preflight RECIPE=NAME   print the memory plan for a recipe (no GPU, no download)"
	@echo "make train RECIPE=NAME       run a recipe end to end (ARGS='key=value ...' to override)"
	@echo "make train-multi GPUS=N RECIPE=NAME   the same on N GPUs of this machine (one process each, DDP)"
	@echo "make merge [ADAPTER=dir]     fold an adapter into its base: a plain transformers model in <run>/merged"
	@echo "make chat [ADAPTER=dir]      chat with base + adapter, streamed (default: the newest adapter)"
	@echo "make ui                      MLflow UI on http://127.0.0.1:$(PORT) over ./mlflow.db"
	@echo "make lint                    ruff"
	@echo "make bench                   every benchmark script in tests/benchmarks/ (results in tests/benchmarks/results/)"
	@echo "make bench-gpu               on a CUDA machine: measured peak memory and speed against the preflight"
	@echo "make clean                   remove outputs/, mlflow.db, mlruns/ (not the venv)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes; otherwise a no-op.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune +recipe=tiny-demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

preflight: $(STAMP)
	$(BIN)/finetune +recipe=$(RECIPE) stages=[preflight] $(ARGS)

train: $(STAMP)
	$(BIN)/finetune +recipe=$(RECIPE) $(ARGS)

# One process per GPU through torchrun (DDP; the plan's FSDP choice is taken from the recipe).
# Every process gets the same run directory, named here once.
train-multi: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node $(GPUS) -m finetune +recipe=$(RECIPE) \
		hardware.num_gpus=$(GPUS) hydra.run.dir=$(RUN_DIR) $(ARGS)

merge: $(STAMP)
	@test -n "$(ADAPTER)" || { echo "no adapter under outputs/: train one, or give ADAPTER=dir"; exit 2; }
	$(BIN)/finetune-merge $(ADAPTER) $(ARGS)

chat: $(STAMP)
	@test -n "$(ADAPTER)" || { echo "no adapter under outputs/: train one, or give ADAPTER=dir"; exit 2; }
	$(BIN)/finetune-chat $(ADAPTER) $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check finetune data_prep tests

# Every script in tests/benchmarks/ (each prints a table and writes JSON to tests/benchmarks/results/);
# a script exits non-zero when it misses its target, and make stops there.
bench: $(STAMP)
	@for script in tests/benchmarks/*.py; do \
		echo "== $$script"; $(BIN)/python $$script || exit 1; \
	done

# On a CUDA machine: a grid of plans on catalog models with random weights, measured against the
# preflight (tests/benchmarks/bench_gpu_memory.py --help for the grid).
bench-gpu: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_gpu_memory.py $(ARGS)

clean:
	rm -rf outputs mlflow.db mlruns
