"""A trained U-Net as a release: its EMA parameters and what they were trained with.

`dprdm export` writes one from a `dprdm train` work directory; the repository ships the offline
default's (releases/offline-default), so the demo need not spend an hour of two CPU cores
training it. A release directory holds:

  ema/               the EMA parameters (orbax StandardCheckpointer, a nested dict)
  linear_tower.npz   the value embedding the U-Net was trained to read (encoders/linear.py),
                     when config.embed.image_tower is "linear"; a pretrained tower (CLIP) is
                     named in release.json instead
  train_log.jsonl    the run's metrics.jsonl, step by step
  release.json       the step, the command, the hash of the training-relevant config, the
                     SHA-256 of linear_tower.npz and the public image store's fingerprint

A release is only as good as its match with today's code and config: `check` refuses one whose
config hash is not the config's (a model, data, encoder or training change means retraining),
and `Generator` refuses a value tower whose file is not the one the release was trained on.
"""

import hashlib
import json
import pathlib
import shutil
import sys
import time

import jax
import ml_collections

from dprdm_jax import errors

MANIFEST = "release.json"
# The parts of a config that decide what training produces (paths, sampling settings and the
# private side do not: one public model serves every private set).
_TRAINING_FIELDS = {
    "model": None, "data": ("tfds_dir", "public_test_split", "private", "private_split"),
    "encoder": ("workdir", "keep_checkpoints"),
    "embed": ("out", "batch_size", "chunk_size"),
    "train": ("workdir", "embeddings", "log_every", "checkpoint_every", "keep_checkpoints"),
    "diffusion": ("sample_steps", "eta", "guidance_scale", "clip_x0"),
}


class ReleaseError(errors.InputError):
  """A release that does not match the code, the config or the towers in use."""


def config_hash(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of the training-relevant parts of `config` (_TRAINING_FIELDS, the blocks it has)
  and its seed."""
  parts = {"seed": config.seed, "embedding_dim": config.privacy.embedding_dim}
  for name, ignored in _TRAINING_FIELDS.items():
    if name not in config:  # configs with a pretrained tower have no encoder block
      continue
    block = config[name].to_dict()
    parts[name] = {k: v for k, v in block.items() if k not in (ignored or ())}
  text = json.dumps(parts, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def is_release(directory) -> bool:
  return (pathlib.Path(directory) / MANIFEST).is_file()


def read(directory) -> dict:
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    raise ReleaseError(f"{directory} is not a release (no {MANIFEST})")
  return json.loads(path.read_text())


def check(config: ml_collections.ConfigDict, directory) -> dict:
  """The release's manifest, or ReleaseError if it was trained under another config."""
  manifest = read(directory)
  if manifest["config_hash"] != config_hash(config):
    raise ReleaseError(f"the release {directory} was trained under another config (hash "
                       f"{manifest['config_hash'][:12]}..., this config {config_hash(config)[:12]}"
                       "...); retrain with `dprdm train` and `dprdm export`")
  return manifest


def check_tower(directory, tower_path) -> None:
  """ReleaseError unless `tower_path` is the value tower file the release was trained on."""
  manifest = read(directory)
  if file_sha256(tower_path) != manifest["linear_tower_sha256"]:
    raise ReleaseError(f"{tower_path} is not the value tower the release {directory} was trained "
                       f"on; copy {pathlib.Path(directory) / 'linear_tower.npz'} there")


def export(config: ml_collections.ConfigDict, workdir, out, command: str = "") -> dict:
  """Writes the release of the latest checkpoint in the `dprdm train` work directory `workdir`."""
  from dprdm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dprdm_jax import sample  # pylint: disable=g-import-not-at-top
  from dprdm_jax import sharding  # pylint: disable=g-import-not-at-top
  from dprdm_jax.encoders import linear  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out).absolute()
  # Only a release is ever replaced: `--out .` or a mistyped path must not delete a directory.
  if out.exists() and not (is_release(out) or (out.is_dir() and not any(out.iterdir()))):
    raise ReleaseError(f"{out} exists and is not a release: `dprdm export` replaces only an "
                       "earlier release; choose another --out")
  _, ema, step = sample.load_ema(config, workdir, sharding.make_mesh(config.mesh))
  if step < config.train.steps:
    raise ReleaseError(f"{workdir} holds step {step} of {config.train.steps}: finish training "
                       "first")
  final, out = out, out.parent / f".{out.name}.export-tmp"  # written aside, then swapped in
  if out.exists():  # a killed export's leftovers (this name is export's own)
    shutil.rmtree(out)
  errors.make_directory(out)
  checkpoints.save_tree(out / "ema", jax.device_get(ema))
  # orbax's marker names the absolute path it wrote to; a release is copied and committed, so it
  # must not carry the exporting machine's paths (a local restore does not read the marker).
  (out / "ema" / "commit_success.txt").unlink(missing_ok=True)
  towers = dict(image_tower=config.embed.image_tower)
  if config.embed.image_tower == "linear":
    shutil.copyfile(pathlib.Path(config.encoder.workdir) / linear.FILE, out / linear.FILE)
    towers["linear_tower_sha256"] = file_sha256(out / linear.FILE)
  shutil.copyfile(workdir / "metrics.jsonl", out / "train_log.jsonl")
  manifest = dict(step=step, config_hash=config_hash(config), command=command,
                  exported=time.strftime("%Y-%m-%d %H:%M:%S %Z"), **towers,
                  public_store_fingerprint=store_lib.EmbeddingStore(
                      config.train.embeddings, verify=False).fingerprint,
                  python=sys.version.split()[0], jax=jax.__version__)
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
  # The earlier release stays whole until the new one is: a crash before this point leaves it,
  # and one between the two renames leaves it at .NAME.export-old beside the new one's parts.
  old = final.parent / f".{final.name}.export-old"
  if old.exists():
    shutil.rmtree(old)
  if final.exists():
    final.rename(old)
  out.rename(final)
  shutil.rmtree(old, ignore_errors=True)
  return manifest


def load_ema(trainer, directory) -> tuple[dict, int]:
  """(EMA parameters placed on the trainer's mesh, step) of the release in `directory`."""
  from dprdm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  manifest = check(trainer.config, directory)
  ema = checkpoints.restore_tree(pathlib.Path(directory) / "ema", trainer.abstract_state["ema"])
  return ema, int(manifest["step"])
