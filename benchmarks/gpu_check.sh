#!/usr/bin/env bash
# The one GPU check: model GPU tests, then the step benchmark sweeps, results into $OUT (default
# bench_results/gpu). Run from the repo root on the lent GPU machine, with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
# Each stage has its own time limit (seconds, T_* to override; they sum to ~530 so one 600 s `run`
# holds all) so a slow compile cannot eat the others; a sweep runs the fastest backend and the
# baseline first and rewrites its JSON after every configuration, so a stage cut short keeps those.
set -uo pipefail
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}

# Composer, Streaming and optimi are not on the GPU image: install the wheels carried in .whl
# (made here by ../shared/device/fetch-wheels.sh .whl) into a private site dir.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "WARNING: no .whl/ (run ../shared/device/fetch-wheels.sh .whl and carry it): optimi is missing," \
       "so every benchmark configuration will fail at the optimizer"
  export PYTHONPATH=$PWD
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

echo "== pytest tests/model (backends run on the GPU where present; gpu-marked ones need it)"
# Exit code 5 = no test selected: not a failure.
timeout ${T_PYTEST:-90} $PY -m pytest -q -ra tests/model -p no:cacheprovider 2>&1 | tail -n 30 | tee "$OUT/pytest_gpu.txt"
rc=${PIPESTATUS[0]}; [ "$rc" = 5 ] && rc=0
echo "pytest rc=$rc" | tee -a "$OUT/pytest_gpu.txt"

bench() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  echo "== bench $name: $*"
  timeout "$limit" $PY benchmarks/bench_step.py --preset base --out-json "$OUT/step_$name.json" "$@" \
    2>&1 | grep -v '^INFO' | tail -n 25 | tee "$OUT/step_$name.txt"
  echo "bench $name rc=${PIPESTATUS[0]}"
}
# The pretraining shape (the recipe's 96 seqs too) and the context-extension shape (12 x 8192).
bench 1024x32 ${T_1024x32:-240} --seq-len 1024 --seqs-per-chunk 32 --sweep --sweep-compile both --steps 10 --warmup 3
bench 1024x96 ${T_1024x96:-100} --seq-len 1024 --seqs-per-chunk 96 --sweep --sweep-compile on --steps 5 --warmup 3
bench 8192x12 ${T_8192x12:-100} --seq-len 8192 --seqs-per-chunk 12 --sweep --sweep-compile on --steps 5 --warmup 3
echo "== done; JSON in $OUT"
