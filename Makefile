# `make test` and `make train` each create their virtual environments if missing and install what
# they need. `make test` runs two lanes: this machine's stack (Python 3.11, JAX 0.10: the whole suite)
# and the accelerator hosts' (Python 3.12, JAX 0.11, tokamax: the tests of what differs between the
# stacks). Each lane's versions are pinned in lanes/<lane>.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
VENV312 := .venv312
BIN312 := $(VENV312)/bin
STAMP312 := $(VENV312)/.installed

CONFIG ?= configs/default.py
WORKDIR ?= runs/default
# pytest worker processes (pytest-xdist; whole files per worker, so module fixtures run once, the longest
# files first: tests/conftest.py). As many as the 2 cores: a third in the first lane (its tests that
# wait on other processes leave a core idle) ran it in 8 min 33 s against 9 min 5 s once, within this
# machine's noise, and more workers than cores make every timing-sensitive test more fragile.
TEST_WORKERS ?= 2

.PHONY: test test-311 test-312 test-fast train bench clean

# Packages install with uv (a fresh environment in seconds where pip takes a minute), itself installed
# first by the interpreter's pip. uv does not read pip's configuration: the folders of wheels pip is
# pointed at (find-links, in its config files or PIP_FIND_LINKS) are handed on, since that is where
# a machine keeps the CPU build of torch that lanes/py311.txt pins (PyPI has only the 5 GB CUDA one
# for Linux). Byte code is compiled at install, as pip does.
UV_VERSION := 0.13.9
FIND_LINKS = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_INSTALL = pip install --quiet --compile-bytecode $(foreach d,$(FIND_LINKS),--find-links $(d))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

# what training needs (make train), and on top of it the test stack (make test)
$(RUN_STAMP): $(BIN)/python pyproject.toml lanes/py311.txt
	$(BIN)/uv $(UV_INSTALL) --python $(BIN)/python -c lanes/py311.txt -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/uv $(UV_INSTALL) --python $(BIN)/python -c lanes/py311.txt -e '.[dev]'
	touch $(STAMP)

# The second lane's interpreter: PYTHON312, python3.12, or pyenv's 3.12 (lanes/find-python312);
# none found is an error, never a skipped lane.
$(BIN312)/python:
	py=$$(lanes/find-python312) && $$py -m venv $(VENV312)
	$(BIN312)/pip install --quiet uv==$(UV_VERSION)

# No torch here (PyPI's Linux torch for 3.12 is the CUDA build): the Hugging Face references come
# from the first lane's interpreter (SWITCHYARD_HF_PYTHON).
$(STAMP312): $(BIN312)/python pyproject.toml lanes/py312.txt
	$(BIN312)/uv $(UV_INSTALL) --python $(BIN312)/python -c lanes/py312.txt -e '.[test,gpu]' xprof transformers safetensors
	touch $(STAMP312)

# The second lane runs the tests marked `stack` (tests/conftest.py), those about what differs between
# the stacks: scanned layers, layout conversion and remat, --plan against a real step, the grouped
# matmul with tokamax, the stage split of profiles, the families' config readers and two families'
# layout invariance, one family's transformers parity with cached decoding and its export (DeepSeek-V3:
# MLA, YaRN, shared experts), checkpoint resume and restore, and scanned training end to end. (Orbax,
# optax, transformers and ml_dtypes are the same versions in both lanes.)
STACK_TESTS ?= tests/test_stack.py tests/test_scan.py tests/test_plan.py tests/test_grouped_matmul.py tests/test_stages.py \
	tests/test_families.py tests/test_interop.py tests/test_checkpoint.py

# The two environments install side by side, then the lanes run one after the other, each on every
# core (side by side, four workers on two cores took longer in all than the two lanes one by one).
# -k: the second lane runs even when the first failed; make test fails if either did.
test:
	$(MAKE) --no-print-directory -j2 --output-sync=target $(STAMP) $(STAMP312)
	$(MAKE) --no-print-directory -k test-311 test-312

# (tests marked accelerator_lane are about the accelerator hosts' stack: the second lane runs them)
test-311: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(BIN)/python -m pytest \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not accelerator_lane" $(PYTEST_ARGS)

test-312: $(STAMP312) $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" SWITCHYARD_HF_PYTHON=$(CURDIR)/$(BIN)/python \
		$(BIN312)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "stack or accelerator_lane" $(PYTEST_ARGS) $(STACK_TESTS)

# The inner loop: the structure, the MoE layer against its naive oracle, causal routing, data, the
# one-line refusals of bad input and metrics (this lane's stack, tests not marked slow).
FAST_TESTS ?= tests/test_structure.py tests/test_moe_oracle.py tests/test_causality.py tests/test_data.py \
	tests/test_bad_input.py tests/test_metrics.py

test-fast: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(BIN)/python -m pytest \
		-n $(TEST_WORKERS) --dist load -m "not slow" $(PYTEST_ARGS) $(FAST_TESTS)

# Trains CONFIG into WORKDIR (re-running resumes from the latest checkpoint), then samples text.
train: $(RUN_STAMP)
	$(BIN)/moe-train --config=$(CONFIG) --workdir=$(WORKDIR) $(TRAIN_ARGS)
	@echo "--- a sample from the trained model (temperature 0.8, top-k 20, seed 0):"
	@$(BIN)/moe-generate --workdir=$(WORKDIR) --prompt='def ' --max_new_tokens=120 --temperature=0.8 --top_k=20 --seed=0
	@echo "---"
	@echo "evaluate:    $(BIN)/moe-eval --workdir=$(WORKDIR)"
	@echo "plot:        $(BIN)/moe-plot --workdir=$(WORKDIR)"
	@echo "tensorboard: tensorboard --logdir $(WORKDIR)/tensorboard   (pip install tensorboard)"

bench: $(RUN_STAMP)
	$(BIN)/moe-bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache
