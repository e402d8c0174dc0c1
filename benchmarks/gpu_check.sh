#!/usr/bin/env bash
# The one GPU check: step benchmarks (ours vs transformers, plus one ablation per optimisation),
# the trainer-level benchmark, then the GPU tests. Results into $OUT (default bench_results/gpu):
# log.txt (everything printed), step_*.json, kernels.json, trainer.json, compile-cache.tar.xz (see
# TORCHINDUCTOR_CACHE_DIR below). Run from the repo root on the lent GPU
# machine, with carry [".whl", ".gpu-cache"] (.whl made here by `bash benchmarks/gpu_wheels.sh`, ~38 MB):
#   bash benchmarks/gpu_check.sh [STAGE...]     (default: every stage, in the order below)
# Stages: pytest-syncs pytest step1024x96 step1024x32 trainer kernels pytest-compiled saved large tuning
# step8192x12 trainer-closure.
# COMPILED_TESTS=flex (a pytest -k expression) narrows the last stage.
# To compare against an older version, export its tree (git archive REV modernbert_train benchmarks
# | tar -x -C .whl/old_src) and run its bench_step.py with PYTHONPATH=/tmp/site:.whl/old_src.
# Each stage has its own time limit (T_* to override). All stages need ~900 s, more than one lent
# session's 15 device minutes with the machine's start: run the default order in one call with
# timeout_s=600 (most important first, in this file's order). Times on 2026-11-28's H200:
# pytest-syncs 104 s, pytest 111 s (the first GPU test of each Triton kernel autotunes and compiles
# its configs, and the compiled-model test builds three models, hence 120 s per test; since
# 2026-12-02 it builds four of 3 layers instead of three of 6), step1024x96
# ~170 s for 3 runs (~220 s with the 4 now), step1024x32 189 s for 5 runs (~230 s with the 6 now),
# trainer ~100 s. Next session: `pytest-syncs step1024x96 step1024x32` in one call (~560 s), then
# `pytest kernels` (~260 s: the cudnn backend's parity tests and compiled model, the LayerNorm
# kernels' GPU parity tests, alone and with the residual add, and the global layers through the
# window kernels; their times alone), then
# `trainer`, then `pytest-compiled saved large tuning step8192x12 trainer-closure` if time is left. A step benchmark
# rewrites its JSON after every configuration, so a stage cut short keeps what it measured.
set -uo pipefail
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "WARNING: no .whl/: composer, streaming and optimi are missing; most stages will fail"
  export PYTHONPATH=$PWD
fi
# torch.compile's caches (Inductor's, and Triton's for its kernels and ours) in one folder. The last
# GPU session's $OUT/compile-cache.tar.xz, copied here to .gpu-cache/ and carried (carry [".whl",
# ".gpu-cache"]), warm-starts every compile whose graph is unchanged since (each configuration's
# compile took ~40-50 s cold on 2026-11-28's H200; on the CPU VM a restored cache took the tiny
# step's from 57 to 19 s). The script's end packs the cache again for the next session.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/triton
if [[ -f .gpu-cache/compile-cache.tar.xz ]]; then
  $PY benchmarks/compile_cache.py unpack .gpu-cache/compile-cache.tar.xz "$TORCHINDUCTOR_CACHE_DIR"
fi
export WANDB_MODE=disabled

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

STAGES=" ${*:-pytest-syncs pytest step1024x96 step1024x32 trainer kernels pytest-compiled saved large tuning step8192x12 trainer-closure} "
want() { [[ $STAGES == *" $1 "* ]]; }
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E '^(INFO|W[0-9]{4} )'
  echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - start))s"
}
step() {  # name, seconds, bench_step args...
  local name=$1 limit=$2; shift 2
  stage "step $name" "$limit" $PY benchmarks/bench_step.py --preset base --out-json "$OUT/step_$name.json" "$@"
}
trainer() {  # name, model overrides...: the real Composer trainer on synthetic shards (the recipe's
  # microbatch, 2 chunks per step) against the raw loop on the same chunks; then 3 more batches with
  # the host's work between steps profiled (where the GPU idles; JSON host_gap_profile)
  local name=$1; shift
  stage "$name" ${T_TRAINER:-160} $PY benchmarks/bench_trainer.py --device cuda --max-seq-len 1024 \
    --microbatch-seqs 96 --chunks-per-step 2 --warmup-batches 3 --batches 8 --time-limit-s 40 \
    --profile-gap 3 --attention-backend $V --compile full --out-json "$OUT/$name.json" "$@"
}
V=torch_varlen

# The whole training step (forward, backward, clipping, StableAdamW) under
# torch.cuda.set_sync_debug_mode("error"), eager and compiled, with and without the window kernel, on
# loader chunks whose pad tail is longer than max_seq_len (2026-11-28: NaN with torch_varlen before the
# loader split the pad tail into max_seq_len documents: data/chunk_layout.py); and the trainer with
# sync_free_steps from one batch's end to three batches later.
want pytest-syncs && stage pytest-syncs ${T_PYTEST_SYNCS:-150} $PY -m pytest -v -ra -m gpu --timeout 80 \
  --tb=short -p no:cacheprovider tests/model/test_host_syncs.py tests/train/test_trainer.py
# Numerical parity of the attention and Triton kernels on this GPU (gpu-marked tests, incl. the
# compiled model with the window kernel on a trainer-like chunk; a per-test limit so a hung test
# cannot hide the summary). The compiled-backend tests of tests/train run later.
want pytest && stage pytest ${T_PYTEST:-240} $PY -m pytest -v -ra -m gpu --timeout 120 --tb=short \
  -p no:cacheprovider -k "not never_synchronizes" tests/model
# ModernBERT's own microbatch (96 x 1024: the memory target) with a kernel profile. The defaults
# (the local layers' Triton attention, config window_attention_kernel: 445.8k tok/s against 418.1k
# without, -win, on 2026-11-28's H200); ours:cudnn: the global layers through cuDNN's fused attention
# on the ragged documents (model/cudnn_attention.py; torch 2.14's varlen_attn does this itself on
# sm90, 2.11's runs FlashAttention-2: ~4.5 ms per global layer, 35.7 of 216 ms per step on
# 2026-11-28); winrope: the same kernels with RoPE inside (config
# window_attention_rope: no RoPE passes over q, k, v in memory on local layers; not yet timed here:
# the stage ran out of time); lnk: every LayerNorm as model/fused_kernels.py's kernels, the residual
# add inside (config fused_layer_norm; the compiled norm's backward took 24.7 of 232.5 ms per step
# on 2026-11-27, but torch 2.11's Inductor already folds the weight gradient in: about as many
# instructions as ours, benchmarks/README.md, so expect little); gwin: the global layers through the window kernels too, no window (config
# global_attention_kernel; torch_varlen's FlashAttention-2 took ~3.8 ms per global layer on
# 2026-11-27). (-win, the backend on the local layers, was timed on 2026-11-28: 418.1k.) lnk moved to
# the tuning stage (expected gain <= 2%).
# bf16res (the residual stream in bf16, config autocast_residual) is timed at 32 x 1024 below, alone.
# ours:$V:full:mem=0.7 trades speed for memory (the compiler's activation memory budget).
want step1024x96 && step 1024x96 ${T_1024x96:-240} --seq-len 1024 --seqs-per-chunk 96 --steps 5 --warmup 3 \
  --baseline none --profile 2 --runs ours:$V:full ours:cudnn:full ours:$V:full:winrope ours:$V:full:gwin
# Pretraining shape, 32 x 1024: ours (the recipe's full compile) vs transformers eager and compiled,
# with a kernel profile (the JSON keeps each run's top 80 kernels: at 32 x 1024 ~10 ms of the 78.7 ms
# step did not scale with the tokens on 2026-11-28 (216.4 ms at 96 x 1024): optimizer, small kernels?),
# then the cudnn backend, then winrope and bf16res one at a time (2026-11-28 timed them together: 2% slower than the
# default, and a loss 0.64 higher after 10 steps, so one of them hurts). Ablations of single
# optimisations: add e.g. ours:$V:regional:-fused ours:$V:regional:-slots ours:flex:regional
# ours:$V:none (regional recompiles are cheap).
want step1024x32 && step 1024x32 ${T_1024x32:-260} --seq-len 1024 --seqs-per-chunk 32 --steps 10 --warmup 3 \
  --profile 2 --runs ours:$V:full hf:sdpa:none hf:sdpa:full ours:cudnn:full ours:$V:full:winrope ours:$V:full:bf16res
# The real Composer trainer on synthetic shards (the recipe's microbatch, 2 chunks per step; a NaN
# loss stops it: train/callbacks.py), stock Composer's bookkeeping and sync_free_steps (the default:
# train/trainer.py, no host wait for the GPU between steps; syncs/step reads 0) side by side, then
# the raw loop on the same chunks.
want trainer && trainer trainer --sync-free both
# GeGLU, RoPE, LayerNorm and a local and a global layer's attention alone at 96 x 1024 tokens: eager,
# torch.compile, the Triton kernels; time, GB/s (TFLOP/s for attention), error against an fp32
# reference, and each Triton kernel's autotuning timings (which tile won).
want kernels && stage kernels ${T_KERNELS:-150} $PY benchmarks/bench_kernels.py --tokens 98304 \
  --out-json "$OUT/kernels.json"
# A global layer through cuDNN (backend cudnn), against the eager row of global_attention above.
want kernels && stage kernels-cudnn ${T_KERNELS_CUDNN:-60} $PY benchmarks/bench_kernels.py --tokens 98304 \
  --ops global_attention --variants eager compiled --attention-backend cudnn --out-json "$OUT/kernels_cudnn.json"
# What the compiled 96 x 1024 step keeps for backward, by shape and dtype (no timing): where the
# activation memory goes with the varlen kernel (does v keep the whole Wqkv output alive?).
want saved && step saved1024x96 ${T_SAVED:-120} --seq-len 1024 --seqs-per-chunk 96 --saved-activations \
  --runs ours:$V:full
# ModernBERT-large at yamls/large.yaml's microbatch (44 x 1024, halved from ModernBERT's 88 on an
# estimate of its activation memory): does it fit an 80 GB H100, and how fast is it?
want large && stage "step large1024x44" ${T_LARGE:-90} $PY benchmarks/bench_step.py --preset large \
  --out-json "$OUT/step_large1024x44.json" --seq-len 1024 --seqs-per-chunk 44 --steps 4 --warmup 2 \
  --baseline none --runs ours:$V:full
# Inductor's coordinate-descent tuning of block sizes (the pointwise and norm kernels run ~3x above
# their memory-traffic bound at 96 x 1024; benchmarks/README.md), against step1024x96's full run.
want tuning && step 1024x96_cdt ${T_TUNING:-200} --seq-len 1024 --seqs-per-chunk 96 --steps 5 --warmup 3 \
  --baseline none --runs ours:$V:full:cdt ours:$V:full:lnk
# At 8192 the global layers' attention is a larger share of the step (documents up to 8192 tokens): gwin.
want step8192x12 && step 8192x12 ${T_8192x12:-240} --seq-len 8192 --seqs-per-chunk 12 --steps 5 --warmup 3 \
  --baseline none --runs ours:$V:full ours:cudnn:full ours:$V:full:-win ours:$V:full:winrope ours:$V:full:gwin \
  ours:$V:full:lnk
# Stock Composer's step through its closure (train/trainer.py turns it off: it reads the loss back
# before the optimizer step): what that bought, against stage trainer's stock row.
want trainer-closure && trainer trainer-closure --composer-closure --sync-free off
# The compiled fast path (every backend, full and per-layer compile) against the eager reference.
want pytest-compiled && stage pytest-compiled ${T_PYTEST_COMPILED:-90} $PY -m pytest -v -ra -m gpu \
  --timeout 80 --tb=short -p no:cacheprovider -k "${COMPILED_TESTS:-compiled}" tests/train/test_compile.py
# For the next GPU session (files come back up to 16 MiB each): copy it to .gpu-cache/ and carry that.
[[ -d $TORCHINDUCTOR_CACHE_DIR ]] && $PY benchmarks/compile_cache.py pack "$TORCHINDUCTOR_CACHE_DIR" \
  "$OUT/compile-cache.tar.xz"
echo "== done; results in $OUT"
