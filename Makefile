# One-line targets; each calls the command the README shows.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV) && $(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' ; $(PY) -c "import modernbert_train, composer, streaming, optimi" && touch $@

demo: install
	$(PY) train.py yamls/tiny.yaml

# TEST_WORKERS pytest-xdist workers (2, CI's cores; 0 runs the tests in one process). worksteal: a
# worker that runs out takes tests queued for the other; xdist's default (load) never takes back
# what it handed out, and once (slow tests sorted first) left a worker idle for ~17 minutes.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
test: install
	$(PY) -m pytest -q -ra $(XDIST)

# Another torch stack, every package pinned in tests/torch-<version>-stack.txt (2.11: the GPU
# machine's; 2.15: the newest torch and transformers checked), and the model, kernel, trainer and benchmark
# tests on it: make test-torch-2.11, make test-torch-2.15 (install-torch-<version> only builds
# .venv-torch-<version>).
# TEST_WORKERS workers here too: on the 2-core CPU VM on 2026-12-03, 2.11's tests took 10m18s
# instead of 14m06s with a warm compile cache, but from a fresh clone (cold cache) only 13m51s
# instead of 16m03s.
.PRECIOUS: .venv-torch-%/.installed
install-torch-%: .venv-torch-%/.installed ;
test-torch-%: .venv-torch-%/.installed
	.venv-torch-$*/bin/python -m pytest -q -ra $(XDIST) tests/model tests/train tests/benchmarks
.venv-torch-%/.installed: tests/torch-%-stack.txt
	python3 -m venv .venv-torch-$* && .venv-torch-$*/bin/python -m pip install -q --disable-pip-version-check --no-deps -r $< -e . 2>&1 | grep -v '^WARNING: Location' ; .venv-torch-$*/bin/python -c "import modernbert_train, composer, streaming, optimi, torch; assert torch.__version__.startswith('$*.'), torch.__version__" && touch $@

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

bench: install
	$(PY) benchmarks/bench_step.py --preset tiny --device cpu --seq-len 128 --seqs-per-chunk 8 --steps 5 --warmup 2

clean:
	rm -rf runs bench_results .pytest_cache
