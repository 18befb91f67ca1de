# Every target creates the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test lint format bench browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, pinned to the releases available offline on our machines
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/camlens demo --out $(DEMO_OUT)
	@echo "open $(DEMO_OUT)/index.html"

# Debian's chromium for the web app's real-browser test (skipped with a message when missing).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) ; } || \
		echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks examples
	$(BIN)/ruff format src tests benchmarks examples

# Each script writes a section; RESULTS.md is their concatenation (see benchmarks/*.py --help).
BENCH_PARTS := methods methods_family runner audit train
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/run.py --out benchmarks/results/methods.md
	$(BIN)/python benchmarks/methods_bench.py --out benchmarks/results/methods_family.md
	$(BIN)/python benchmarks/runner_bench.py --out benchmarks/results/runner.md
	$(BIN)/python benchmarks/audit_bench.py --out benchmarks/results/audit.md
	$(BIN)/python benchmarks/train_bench.py --out benchmarks/results/train.md
	cat $(BENCH_PARTS:%=benchmarks/results/%.md) > benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
