#!/usr/bin/env bash
# N local processes on 127.0.0.1, each with DEVICES fake CPU devices: a multi-host run on one machine.
#   NUM_PROCESSES=2 DEVICES=4 launch/local.sh --config configs/sd21_depth.py:tiny --workdir runs/local
# Every extra argument goes to `python -m jointnet_jax.train`. Logs: $WORKDIR_LOGS (default ./local_logs)/process_i.log
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES=${DEVICES:-4}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
LOGS=${WORKDIR_LOGS:-./local_logs}
mkdir -p "$LOGS"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES} ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
    "$PYTHON" -m jointnet_jax.train --coordinator "127.0.0.1:${PORT}" --num_processes "$NUM_PROCESSES" \
    --process_id "$i" "$@" >"$LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
