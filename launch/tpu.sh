#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice: one command from your workstation.
#
#   bash launch/tpu.sh TPU_NAME ZONE --config configs/coco.py [--config.x=y ...]
#
# Each worker needs this repository at ~/dprdm-jax (clone it there, or mount a shared disk) and
# the data the config names. The command sets up .venv on each worker with jax[tpu], then runs
# `dprdm train --distributed`: jax.distributed.initialize() finds the other workers of the slice,
# every worker reads its share of each global batch, and process 0 writes the metrics. The work
# directory must be on storage all workers share (a GCS path, or a shared disk) so that the
# orbax checkpoints are one checkpoint.
#
# Not run by the tests (they have no TPU); the multi-process path it takes is tested with two CPU
# processes in tests/test_train.py.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash launch/tpu.sh TPU_NAME ZONE [dprdm train flags]" >&2
  exit 2
fi
name=$1
zone=$2
shift 2
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/dprdm-jax && JAX_ACCELERATOR=tpu bash launch/local.sh train --distributed $(printf '%q ' "$@")"
