# One-line targets; each calls the command the README shows.
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_211 ?= .venv-torch-2.11

.PHONY: install install-torch-2.11 demo test test-fast test-torch-2.11 bench clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV) && $(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; $(PY) -c "import modernbert_train, composer, streaming, optimi" && touch $@

demo: install
	$(PY) train.py yamls/tiny.yaml

test: install
	$(PY) -m pytest -q -ra

# The GPU machine's stack (torch 2.11, all pinned), and the model, kernel and trainer tests on it.
install-torch-2.11: $(VENV_211)/.installed
test-torch-2.11: $(VENV_211)/.installed
	$(VENV_211)/bin/python -m pytest -q -ra tests/model tests/train tests/benchmarks
$(VENV_211)/.installed: tests/torch-2.11-stack.txt
	python3 -m venv $(VENV_211) && $(VENV_211)/bin/python -m pip install -q --disable-pip-version-check --no-deps -r tests/torch-2.11-stack.txt -e . 2>&1 | grep -v '^WARNING: Location' ; $(VENV_211)/bin/python -c "import modernbert_train, composer, streaming, optimi, torch; assert torch.__version__.startswith('2.11'), torch.__version__" && touch $@

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) benchmarks/bench_step.py --preset tiny --device cpu --seq-len 128 --seqs-per-chunk 8 --steps 5 --warmup 2

clean:
	rm -rf runs bench_results .pytest_cache
