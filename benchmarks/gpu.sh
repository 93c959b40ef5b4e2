#!/usr/bin/env bash
# GPU variants (bf16) of twin_forward.py, sample.py and train.py; ~8-10 min on one H100 from a cold start.
# Run from the repo root on a machine that already has jax[cuda], flax, optax, orbax, transformers, diffusers
# and torch (grain/array_record optional: train.py falls back to an in-memory batch without them).
# Writes JSON lines (+ the markdown table at the end of each file) and stderr logs into $OUT.
set -u
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}  # leave room for torch in-process
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package need not be pip-installed
SKIP_TORCH=""
$PY -c 'import diffusers' 2> /dev/null || SKIP_TORCH="--skip-torch"  # torch baselines need diffusers
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; uptime; } > "$OUT/machine.txt" 2>&1
$PY -c 'import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())' >> "$OUT/machine.txt" 2>&1
$PY -c 'import grain, array_record; print("grain ok")' >> "$OUT/machine.txt" 2>&1 || echo "no grain: train.py uses its fallback" >> "$OUT/machine.txt"

timeout 120 $PY benchmarks/twin_forward.py --device gpu --dtype bf16 --sizes 64 --skip-memory --xla-flags default $SKIP_TORCH \
  > "$OUT/twin_forward.jsonl" 2> "$OUT/twin_forward.err"
timeout 200 $PY benchmarks/sample.py --device gpu --dtype bf16 --sizes 256 512 --steps 10 --repeats 2 $SKIP_TORCH \
  > "$OUT/sample.jsonl" 2> "$OUT/sample.err"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9  # train.py: JAX and torch run in separate processes
timeout 150 $PY benchmarks/train.py --device gpu --dtype bf16 --config tiny --remat off --steps 5 $SKIP_TORCH \
  > "$OUT/train_tiny.jsonl" 2> "$OUT/train_tiny.err"
timeout 360 $PY benchmarks/train.py --device gpu --dtype bf16 --config sd21 --resolution 512 --batch 4 --remat off on \
  --steps 3 $SKIP_TORCH > "$OUT/train_sd21.jsonl" 2> "$OUT/train_sd21.err"
for f in "$OUT"/*.jsonl; do echo "== $f"; tail -n 6 "$f"; done
