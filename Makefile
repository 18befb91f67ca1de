# Every target creates the virtual environment when it is missing: `make demo` installs only
# what the demo needs (camlens and torch), `make test` everything the tests use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
FULL := $(VENV)/.installed-test
DEMO_OUT ?= demo_out
# The releases this project's machines install offline; camlens itself needs torch >= 2.4.
TORCH := "torch==2.14.1"
TORCHVISION := "torchvision==0.29.1"

.PHONY: demo test lint format bench browser clean

$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(FULL): $(CORE)
	$(BIN)/pip install -q $(TORCH) $(TORCHVISION)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(CORE)
	$(BIN)/camlens demo --out $(DEMO_OUT) --overwrite
	@echo "open $(DEMO_OUT)/index.html"

# Debian's chromium for the web app's real-browser test. Without it that test is skipped
# (and fails under CI=true, where it must run).
browser:
	@test -x /usr/bin/chromium || { \
		echo "make test: installing Debian's chromium for the browser test (apt-get install chromium)"; \
		command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || \
		echo "make test: chromium could not be installed; the browser test will be skipped"; }

test: $(FULL) browser
	$(BIN)/ruff check src tests benchmarks examples conftest.py
	$(BIN)/ruff format --check src tests benchmarks examples conftest.py
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(FULL)
	$(BIN)/ruff check src tests benchmarks examples conftest.py
	$(BIN)/ruff format --check src tests benchmarks examples conftest.py
	$(BIN)/lint-imports

format: $(FULL)
	$(BIN)/ruff check --fix src tests benchmarks examples conftest.py
	$(BIN)/ruff format src tests benchmarks examples conftest.py

# Each script writes a section; RESULTS.md is their concatenation (see benchmarks/*.py --help).
BENCH_PARTS := methods methods_family runner throughput audit train serve evaluate vit gpu
bench: $(FULL)
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/run.py --out benchmarks/results/methods.md
	$(BIN)/python benchmarks/methods_bench.py --out benchmarks/results/methods_family.md
	$(BIN)/python benchmarks/runner_bench.py --out benchmarks/results/runner.md
	$(BIN)/python benchmarks/audit_bench.py --out benchmarks/results/audit.md
	$(BIN)/python benchmarks/train_bench.py --out benchmarks/results/train.md
	$(BIN)/python benchmarks/serve_bench.py --out benchmarks/results/serve.md
	$(BIN)/python benchmarks/evaluate_bench.py --out benchmarks/results/evaluate.md
	$(BIN)/python benchmarks/throughput_bench.py --out benchmarks/results/throughput.md
	$(BIN)/python benchmarks/vit_bench.py --out benchmarks/results/vit.md
	$(BIN)/python benchmarks/gpu.py --out benchmarks/results/gpu.md
	cat $(BENCH_PARTS:%=benchmarks/results/%.md) > benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
