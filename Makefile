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

.PHONY: help install demo test preflight train ui lint clean

help:
	@echo "make install                 create $(VENV) (if missing) and install finetune with its dev tools"
	@echo "make demo                    fine-tune the tiny demo model on the CPU (data, preflight, QLoRA, eval, MLflow)"
	@echo "make test                    run the test suite (CPU only, no network)"
	@echo "make preflight RECIPE=NAME   print the memory plan for a recipe (no GPU, no download)"
	@echo "make train RECIPE=NAME       run a recipe end to end (ARGS='key=value ...' to override)"
	@echo "make ui                      MLflow UI on http://127.0.0.1:$(PORT) over ./mlflow.db"
	@echo "make lint                    ruff"
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

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check finetune data_prep tests

clean:
	rm -rf outputs mlflow.db mlruns
