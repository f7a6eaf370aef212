#!/usr/bin/env bash
# Runs one dprdm job on this machine's NVIDIA GPUs: sets up .venv with CUDA JAX (the first time,
# and again when setup.cfg changes), then runs the job there, as one process over every GPU:
#
#   bash launch/gpu.sh [--dry-run] JOB [dprdm flags...]
#   bash launch/gpu.sh train --config configs/coco.py --config.mesh.fsdp=8
#
# JOB is any `dprdm` job (train, embed, generate, evaluate...); config.mesh spreads it over the
# GPUs. The set-up is `JAX_ACCELERATOR=cuda12 bash launch/local.sh install` (JAX_ACCELERATOR=cuda13
# for the CUDA 13 build); the job runs with JAX_PLATFORMS=cuda, so it stops with an error instead of
# running on the CPU when JAX finds no GPU. --dry-run prints both commands instead of running them.
# Several GPU hosts: run `dprdm train --coordinator HOST:PORT --num-processes N --process-id I` on
# each (README, "On TPU pods, GPUs and in Colab").
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: bash launch/gpu.sh [--dry-run] JOB [dprdm flags...]" >&2
  [ $# -eq 0 ] || echo "launch/gpu.sh: $*" >&2
  exit 2
}

dry=0
if [ "${1:-}" = --dry-run ]; then
  dry=1
  shift
fi
[ $# -ge 1 ] || usage "give a JOB"
[[ $1 =~ ^[a-z][-a-z]*$ ]] || usage "bad job '$1'"
accelerator=${JAX_ACCELERATOR:-cuda12}
[[ $accelerator =~ ^cuda[0-9]+$ ]] || usage "JAX_ACCELERATOR must name a CUDA build (cuda12," \
  "cuda13), not '$accelerator'"

if [ $dry = 1 ]; then
  echo "JAX_ACCELERATOR=$accelerator bash launch/local.sh install"
  printf 'JAX_PLATFORMS=cuda .venv/bin/dprdm'
  printf ' %q' "$@"
  echo
  exit 0
fi
JAX_ACCELERATOR=$accelerator bash launch/local.sh install
JAX_PLATFORMS=cuda exec .venv/bin/dprdm "$@"
