#!/usr/bin/env bash
# Runs every accelerator check in one go and prints one table (benchmarks/device_check.py says
# what each check measures):
#
#   bash benchmarks/device_check.sh [--tiny] [--budget_s=480] [--out=FILE] [device_check.py flags]
#
# Set the machine up first: `JAX_ACCELERATOR=cuda12 bash launch/local.sh install` on a GPU host,
# JAX_ACCELERATOR=tpu on a TPU VM. Runs with $PYTHON if set, else .venv/bin/python, else python3,
# with this repository on PYTHONPATH (so a Python with JAX and the dependencies installed, but not
# this package, runs it too). Each check's process may take 90% of an accelerator's memory (JAX's
# default is 75%; XLA_PYTHON_CLIENT_MEM_FRACTION overrides it). --budget_s bounds the whole run:
# give it about a minute less than any limit the run itself is under.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$python" benchmarks/device_check.py "$@"
