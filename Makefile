# `make test` and `make train` each create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CONFIG ?= configs/default.py
WORKDIR ?= runs/default
# pytest worker processes (pytest-xdist; whole files per worker, so module fixtures run once)
TEST_WORKERS ?= 2

.PHONY: test train bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(BIN)/python -m pytest \
		-n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Trains CONFIG into WORKDIR (re-running resumes from the latest checkpoint), then samples text.
train: $(STAMP)
	$(BIN)/moe-train --config=$(CONFIG) --workdir=$(WORKDIR) $(TRAIN_ARGS)
	@echo "--- a sample from the trained model (temperature 0.8, top-k 20, seed 0):"
	@$(BIN)/moe-generate --workdir=$(WORKDIR) --prompt='def ' --max_new_tokens=120 --temperature=0.8 --top_k=20 --seed=0
	@echo "---"
	@echo "evaluate:    $(BIN)/moe-eval --workdir=$(WORKDIR)"
	@echo "plot:        $(BIN)/moe-plot --workdir=$(WORKDIR)"
	@echo "tensorboard: tensorboard --logdir $(WORKDIR)/tensorboard   (pip install tensorboard)"

bench: $(STAMP)
	$(BIN)/moe-bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
