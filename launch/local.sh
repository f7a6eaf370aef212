#!/usr/bin/env bash
# Sets up dprdm-jax on this machine (first run, or when setup.cfg changed) and runs one job:
#
#   bash launch/local.sh demo     the main job on the embedded default
#   bash launch/local.sh test     the whole test suite (add pytest arguments after it)
#   bash launch/local.sh bench    the benchmarks in benchmarks/ (installs the peers first)
#
# Needs only python3 (3.10+), git and, on Debian/Ubuntu without python3-venv, apt-get. Everything
# goes into .venv beside this repository; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

job=${1:-demo}
shift || true
venv=.venv
stamp="$venv/.dprdm-installed"

apt_install() {
  if command -v apt-get >/dev/null; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"
  else
    echo "launch/local.sh: please install: $*" >&2
    exit 1
  fi
}

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv" >&2
  python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
fi
extras=test
[ "$job" = bench ] && extras=test,bench
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16) $extras"
if ! grep -qx "$want" "$stamp" 2>/dev/null; then
  echo "== installing dprdm-jax[$extras] into $venv (about a minute the first time)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[$extras]"
  echo "$want" >"$stamp"
fi

export PATH="$PWD/$venv/bin:$PATH"
case "$job" in
  demo)
    # Until the end-to-end pipeline lands, the main job is the privacy planner on the paper's
    # MS-COCO setting: the noise each (q, k) needs for 10,000 queries within epsilon = 10.
    dprdm privacy plan --config configs/coco.py "$@"
    ;;
  test)
    python -m pytest "$@"
    ;;
  bench)
    python benchmarks/aggregate.py "$@"
    python benchmarks/accounting.py
    python benchmarks/retrieval.py
    ;;
  *)
    echo "usage: bash launch/local.sh demo|test|bench [args]" >&2
    exit 2
    ;;
esac
