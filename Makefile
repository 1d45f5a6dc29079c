# Set-up and everyday commands. `make quickstart` and `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's CPU shm op, JIT-built once into the environment (raycmr/ops.py), not by a first run.
OPS := $(VENV)/.ops-built

.PHONY: install quickstart test test-docs test-fast lint bench wikipedia clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(OPS): $(STAMP)
	@$(BIN)/python -c 'import raycmr.train.ops as o; o.main()'
	@touch $(OPS)

install: $(STAMP) $(OPS)

quickstart: $(STAMP) $(OPS)
	$(BIN)/python jobs/quickstart.py

test: $(STAMP) $(OPS)
	$(BIN)/python -m pytest -q -x --durations=15 -m "not docs" tests

# The README's and docs' marked command blocks, run verbatim in a fresh folder (a few minutes).
test-docs: $(STAMP) $(OPS)
	$(BIN)/python -m pytest -q -x -m docs tests/test_docs.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray" tests

lint: $(STAMP)
	$(BIN)/ruff check raycmr tests jobs benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --small

wikipedia: $(STAMP)
	$(BIN)/raycmr shards wikipedia --out out/wikipedia/shards --overwrite
	$(BIN)/raycmr train --config wikipedia --eval-test

clean:
	rm -rf runs out
