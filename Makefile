# Two entry points, both self-contained on a fresh machine (Python 3.11, CPU, no hub):
#   make main   set up .venv and run the main job
#   make test   set up .venv and run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: main test setup
setup: $(VENV)/.installed

# torch first, pinned: on a CPU-only machine `torch==2.13.0` is the CPU wheel; anything unpinned, or
# installing peft/bitsandbytes first, would pull a multi-GB CUDA build. On a GPU machine install the
# torch build you want before running this.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[notebooks,gpu,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

main: setup
	$(BIN)/python -m gistlib run configs/pocket.json

# pytest exits 5 when it collects no test: that is a failure too.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
