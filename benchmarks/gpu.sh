#!/usr/bin/env bash
# The GPU checks, one script, under 8 minutes on one H100: the device tests, the penalty benchmark on CUDA
# (Wasserstein vs reverse KL on the same bf16 logits, B=8, T=1024, V=49,152 and 151,936, random embeddings of
# the right shape), the scoring-memory benchmark on CUDA and a PPO step of a model shaped like the default one.
#
# Prepare here (CPU machine):   make gpu-bundle      # .whl/ (pure-Python deps) and .gl/smollm2/ (config, tokenizer)
# Run there (device tool):      bash benchmarks/gpu.sh      with carry [".whl", ".gl"]
# Results: benchmarks/results/gpu_*.json (and copies under $OUT when set); commit them and regenerate the README
# tables (python benchmarks/readme_tables.py). Never part of CI.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/results
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure, report it
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "!! $name failed (status $?)"; status=1; }
    echo "== $name took $((SECONDS - start))s"
}
python -m pip install --no-index --find-links .whl --quiet vaderSentiment pytest 2>&1 | tail -2
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
step "device tests" 90 python -m pytest -q -x tests/gpu
step "penalty V=49152" 100 python benchmarks/penalty.py --devices cuda --batch 8 --steps 1024 --vocab 49152 \
    --top-k 64 128 --logits-dtype bfloat16 --out "$RESULTS/gpu_penalty_v49k.json"
step "penalty V=151936" 100 python benchmarks/penalty.py --devices cuda --batch 8 --steps 1024 --vocab 151936 \
    --top-k 64 128 --logits-dtype bfloat16 --out "$RESULTS/gpu_penalty_v152k.json"
step "scoring memory" 50 python benchmarks/scoring_memory.py --device cuda --steps 1024 \
    --whole-limit-gb 60 --out "$RESULTS/gpu_scoring_memory.json"
step "PPO step" 80 python benchmarks/ppo_step.py --model .gl/smollm2 --random-weights --batch-size 32 \
    --response-length 128 --steps 2 --dtype bfloat16 --out "$RESULTS/gpu_ppo_step.json"
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/gpu_*.json "$OUT"/ 2>/dev/null; fi
exit $status
