"""Releases (`dprdm export`): the EMA of a training run, refused under another config or tower;
and the release the repository ships loads into today's default model."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from dprdm_jax import generate
from dprdm_jax import release
from dprdm_jax import sample
from dprdm_jax import sharding
from tests.test_configs import load

SHIPPED = pathlib.Path(__file__).parent.parent / "releases" / "offline-default"
PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


def test_the_config_hash_follows_training_settings_not_paths_or_sampling():
  config = load("configs/default.py")
  same = [load("configs/default.py", "--config.train.workdir=/x", "--config.embed.out=/y",
               "--config.diffusion.guidance_scale=7", "--config.diffusion.eta=0")]
  other = [load("configs/default.py", flag) for flag in (
      "--config.train.steps=10", "--config.model.base_channels=8", "--config.seed=1",
      "--config.diffusion.p_uncond=0.2", "--config.encoder.linear_dim=32",
      "--config.data.public=mnist5k")]
  assert all(release.config_hash(c) == release.config_hash(config) for c in same)
  assert len({release.config_hash(c) for c in other + [config]}) == len(other) + 1


@pytest.mark.slow
def test_the_shipped_release_matches_todays_default_and_loads_into_its_model():
  config = load("configs/default.py")
  manifest = release.check(config, SHIPPED)  # trained under today's config
  assert manifest["step"] == config.train.steps
  assert release.file_sha256(SHIPPED / "linear_tower.npz") == manifest["linear_tower_sha256"]
  assert "dprdm export" in manifest["command"]
  assert (SHIPPED / "train_log.jsonl").read_text().count("\n") >= config.train.steps // 50
  trainer, ema, step = sample.load_ema(config, SHIPPED, sharding.make_mesh(config.mesh))
  assert step == config.train.steps
  shapes = jax.tree.map(lambda x: x.shape, trainer.abstract_state["ema"])
  assert jax.tree.map(lambda x: x.shape, ema) == shapes
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ema))


def test_an_export_never_replaces_what_is_not_a_release(tmp_path):
  """`dprdm export --out DIR` replaced DIR whatever it held (shutil.rmtree): `--out .` would have
  deleted the checkout. Now a directory with other files, or a file, is refused before any work,
  and left as it was."""
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "notes.txt").write_text("mine")
  (tmp_path / "file").write_text("mine too")
  config = load("configs/default.py:tiny")
  for out in (tmp_path / "work", tmp_path / "file", tmp_path):
    with pytest.raises(release.ReleaseError, match="is not a release"):
      release.export(config, tmp_path / "no-such-run", out)
  assert (tmp_path / "work" / "notes.txt").read_text() == "mine"
  assert (tmp_path / "file").read_text() == "mine too"


@pytest.mark.slow
def test_an_export_draws_what_its_run_draws_and_is_refused_elsewhere(tiny_product, tmp_path):
  root, overrides = tiny_product
  config = load("configs/default.py:tiny", *overrides)
  manifest = release.export(config, root / "unet", tmp_path / "release", command="dprdm export")
  assert manifest["step"] == config.train.steps
  from_run = generate.generate(config, PROMPTS, tmp_path / "run", "none", progress=False)
  shipped = load("configs/default.py:tiny", *overrides,
                 f"--config.generate.checkpoint={tmp_path / 'release'}")
  from_release = generate.generate(shipped, PROMPTS, tmp_path / "rel", "none", progress=False)
  assert from_release["generated_now"] == from_run["generated_now"] == 2
  for i in range(2):
    assert (tmp_path / "run" / f"{i:05d}.png").read_bytes() == (
        tmp_path / "rel" / f"{i:05d}.png").read_bytes()
  # Another training config: refused.
  with pytest.raises(release.ReleaseError, match="another config"):
    generate.Generator(load("configs/default.py:tiny", *overrides, "--config.train.steps=9",
                            f"--config.generate.checkpoint={tmp_path / 'release'}"))
  # Another value tower than the one it was trained on: refused.
  encoder = tmp_path / "encoder"
  shutil.copytree(root / "encoder", encoder)
  with np.load(encoder / "linear_tower.npz") as f:
    arrays = {k: f[k] for k in f.files}
  arrays["mean"] = arrays["mean"] + 1e-3
  np.savez(encoder / "linear_tower.npz", **arrays)
  with pytest.raises(release.ReleaseError, match="not the value tower"):
    generate.Generator(load("configs/default.py:tiny", *overrides,
                            f"--config.encoder.workdir={encoder}",
                            f"--config.generate.checkpoint={tmp_path / 'release'}"))
  # Exporting again replaces the release whole, with nothing left beside it.
  again = release.export(config, root / "unet", tmp_path / "release", command="dprdm export")
  assert again["step"] == manifest["step"] and release.is_release(tmp_path / "release")
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".release")]
  # Exporting an unfinished run is refused.
  with pytest.raises(release.ReleaseError, match="finish training"):
    release.export(load("configs/default.py:tiny", *overrides, "--config.train.steps=20"),
                   root / "unet", tmp_path / "early")
