#!/usr/bin/env bash
# Issue 19 on one GPU: sampling latency through the real `jointnet-sample` CLI and stage-1 training through the
# real Trainer (records read by grain; with and without the latent cache), bf16 compute, fp32 parameters, on an
# SD2.1-base-shaped random base (benchmarks/train.py writes it). Run from the repo root on the GPU machine:
#
#   OUT=/path/to/out PARTS="sample train" BUDGET_S=480 bash benchmarks/gpu.sh    # first call
#   OUT=/path/to/out PARTS="cache" BUDGET_S=300 bash benchmarks/gpu.sh           # second call
#
# The machine reaches no package registry: the packages its image lacks (grain, array_record, tfds,
# ml_collections, ...) travel as the wheelhouse `benchmarks/gpu_wheelhouse.sh` builds (WHEELS, default .whl),
# installed here into /tmp/site. Each part runs only if the time budget left allows it (its own estimate, from
# the H100 run of 2026-11: the SD2.1 train step compiles in about 160 s there), and each writes JSON lines and
# a log into $OUT, so a call stopped at its limit still returns what it measured. Parts:
#   sample  `jointnet-sample generate` at 512², 50 DDIM steps, CFG 7.5: batch 1 (3 calls in one process, the
#           first compiles; the CLI's own timer covers the text encoder, the loop and the VAE decode) and batch
#           8 (2 calls), images/s from the last call
#   train   benchmarks/train.py: stage 1 at 512², batch 4, remat off, encoding in the step: MFU by the analytic
#           count (training/flops.py) and by XLA's, peak device memory (goal 3), a profile of one step
#   cache   the same from a latent cache written first (no VAE or text encoder in the step), batch $CACHE_BATCH
#           (default 16) with remat on, and its profile
set -u
OUT=${OUT:-bench_out}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
PARTS=${PARTS:-"sample train cache"}
BUDGET_S=${BUDGET_S:-540}
CACHE_BATCH=${CACHE_BATCH:-16}
SIZE=${SIZE:-512}  # image side of the sampling part
BASE=${BASE:-/tmp/jointnet_bench_base_sd21}
TWIN=${TWIN:-/tmp/jointnet_bench_twin_sd21}
START=$(date +%s)
mkdir -p "$OUT"
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUT/gpu.log"; }

if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    > "$OUT/pip.err" 2>&1 || { log "the wheelhouse $WHEELS did not install (see pip.err)"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package itself need not be pip-installed
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}  # a rerun on a warm machine reuses it
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; uptime; } > "$OUT/machine.txt" 2>&1
$PY -c 'import jax, flax, optax, orbax.checkpoint as o, grain, array_record, ml_collections, tensorflow_datasets as t
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "grain", grain.__version__,
      "tfds", t.__version__, jax.devices())' >> "$OUT/machine.txt" 2>&1 \
  || { log "the real path's packages do not import (machine.txt)"; exit 1; }

if [ ! -f "$TWIN/jointnet/config.json" ]; then
  log "writing the SD2.1-shaped random base and its twin"
  $PY -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
import train
import jointnet_jax as jj
base = train.write_sd21_base(Path('$BASE'))
jj.JointNet.from_unet(jj.load_unet(base / 'unet')).save(Path('$TWIN'))
" > "$OUT/models.err" 2>&1 || { log "the random base could not be written (models.err)"; exit 1; }
fi

sample() {  # name, seconds needed, CLI arguments
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then log "skipped $name: $(left) s left, it needs about $need s"; return; fi
  log "sample $name"
  timeout "$(left)" $PY -m jointnet_jax.sample generate --base "$BASE" --model "$TWIN" --prompt "a red sphere on a \
wooden table" --steps 50 --cfg 7.5 --sampler ddim --height "$SIZE" --width "$SIZE" --dtype bf16 --seed 0 "$@" \
    --out "/tmp/gen_$name" > "$OUT/sample_$name.log" 2>&1
  $PY -c "import json; r = json.load(open('/tmp/gen_$name/0000.json')); print(json.dumps({'part': 'sample', \
'name': '$name', **r['timings_s']}))" >> "$OUT/sample.jsonl" 2>> "$OUT/sample_$name.log"
}

train() {  # name, seconds needed, train.py arguments
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then log "skipped $name: $(left) s left, it needs about $need s"; return; fi
  log "train $name"
  timeout "$(left)" $PY benchmarks/train.py --device gpu --dtype bf16 --config sd21 --resolution 512 --steps 5 \
    --skip-torch --profile --base-dir "$BASE" "$@" > "$OUT/train_$name.jsonl" 2> "$OUT/train_$name.err"
}

for part in $PARTS; do
  case $part in
    sample)
      sample b1 120 --repeats 3
      sample b8 90 --num-samples 8 --repeats 2
      ;;
    train) train in_step 230 --batch 4 --remat off --latents off ;;
    cache) train cached 230 --batch "$CACHE_BATCH" --remat on --latents on ;;
    *) log "unknown part $part (sample, train, cache)" ;;
  esac
done
log "done"
for f in "$OUT"/*.jsonl; do echo "== $f"; tail -n 4 "$f"; done
