# The README's two commands: `make demo` and `make test`. Each creates .venv if
# needed and installs what it needs; nothing else must be on the machine but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# This machine's wheels (pip takes them from local disk); other machines may use any torch>=2.3.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.swpfx-installed

.PHONY: demo test test-slow fuzz-nightly install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[demo,test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/swpfx demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow" -q tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m slow -q tests

fuzz-nightly: $(STAMP)
	SWPFX_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -n 2 -m slow -q tests/test_fuzz.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
