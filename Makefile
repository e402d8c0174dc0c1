# One-line targets; each calls the command the README shows.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV) && $(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; $(PY) -c "import modernbert_train, composer, streaming, optimi" && touch $@

demo: install
	$(PY) train.py yamls/tiny.yaml

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) benchmarks/bench_step.py --preset tiny --device cpu --seq-len 128 --seqs-per-chunk 8 --steps 5 --warmup 2

clean:
	rm -rf runs bench_results .pytest_cache
