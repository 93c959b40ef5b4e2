#!/usr/bin/env bash
# Run a training config on every worker of a Cloud TPU pod slice (JAX finds the other hosts itself).
#   TPU=my-pod ZONE=us-central2-b launch/tpu_pod.sh --config configs/sd21_depth.py --workdir gs://bucket/run \
#       --config.base=/mnt/sd21-base --config.data.paths='/mnt/data/*.array_record'
# The repo must be present at $REPO on every worker (e.g. a shared disk or a prior `gcloud ... scp`).
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/jointnet-jax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && pip install -q -e '.[tpu]' && python -m jointnet_jax.train $*"
