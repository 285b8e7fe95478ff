# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# On a machine without CUDA, torch is pinned first to the CPU wheel (a looser spec pulls a
# multi-GB CUDA build); the package and its extras come after it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LVR := $(VENV)/bin/lvr
STAMP := $(VENV)/.lvr-installed
TORCH ?= torch==2.13.0
export LVR_CACHE ?= $(CURDIR)/.cache/lvr
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS ?= 0
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=

.PHONY: install test test-unit test-integration test-gpu demo bench bench-response bench-cap lock clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(LVR) lock --check
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

# CUDA checks (skipped without a GPU): parity on GPU kernels, NCCL, bench-mrsp, vLLM.
test-gpu: install
	$(PY) -m pytest -q -rs tests/gpu

lock: install
	$(LVR) lock

# The whole pipeline on synthetic videos with tiny local models (CPU, minutes; see README).
demo: install
	$(LVR) synth recipes/demo/synth.toml output.overwrite=true
	$(LVR) caption recipes/demo/caption.toml output.overwrite=true
	@# generate-qa talks HTTP to the demo's stand-in for a reasoning LLM (answers from the ground truth)
	$(PY) -m stages.data.gt_server --data runs/demo/data --port 8765 & pid=$$!; sleep 2; \
	  $(LVR) generate-qa recipes/demo/generate_qa.toml output.overwrite=true; rc=$$?; kill $$pid; exit $$rc
	$(LVR) filter recipes/demo/filter.toml output.overwrite=true
	$(LVR) sft recipes/demo/sft.toml output.overwrite=true
	$(LVR) eval recipes/demo/eval.toml model.path=runs/demo/sft/final output.dir=runs/demo/eval_sft output.overwrite=true
	$(LVR) rl recipes/demo/rl.toml model.path=runs/demo/sft/final output.overwrite=true
	$(LVR) eval recipes/demo/eval.toml model.path=runs/demo/rl/final output.overwrite=true
	$(PY) -m lvr_cli.demo_summary runs/demo

bench: install
	$(LVR) bench-mrsp recipes/demo/bench.toml output.overwrite=true

# The shared-prompt speed-up as responses grow (32, 128, 512 tokens at 512 frames).
bench-response: install
	$(LVR) bench-mrsp recipes/demo/bench_response.toml output.overwrite=true

# The largest video each mode fits under a memory cap per rank (one step per probe).
bench-cap: install
	$(LVR) bench-mrsp recipes/demo/bench_cap.toml output.overwrite=true

clean:
	rm -rf runs .cache $(VENV)
