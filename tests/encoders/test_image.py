"""The image tower: shapes, unit norm, batch padding, data-parallel sharding, config round trip."""

import jax
import numpy as np
import pytest

from dprdm_jax.encoders import image as image_lib

CONFIG = image_lib.TowerConfig(width=32, depth=2, dim=24, in_channels=1, resolution=16)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def test_unit_rows_and_batch_invariance():
  tower = image_lib.init(CONFIG, seed=0)
  images = _images(37)
  small = image_lib.ImageEncoder(tower, batch_size=8).encode_images(images)
  large = image_lib.ImageEncoder(tower, batch_size=64).encode_images(images)
  assert small.shape == (37, 24) and small.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(small, large, atol=1e-5)
  assert image_lib.ImageEncoder(tower).encode_images(images[:0]).shape == (0, 24)


def test_sharded_over_eight_devices_equals_one():
  assert jax.device_count() == 8
  tower = image_lib.init(CONFIG, seed=1)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images = _images(50, seed=2)
  np.testing.assert_allclose(
      image_lib.ImageEncoder(tower, 16, sharding).encode_images(images),
      image_lib.ImageEncoder(tower, 16).encode_images(images), atol=1e-5)


def test_seeds_differ_and_repeat():
  a = image_lib.ImageEncoder(image_lib.init(CONFIG, 0)).encode_images(_images(4))
  b = image_lib.ImageEncoder(image_lib.init(CONFIG, 0)).encode_images(_images(4))
  c = image_lib.ImageEncoder(image_lib.init(CONFIG, 1)).encode_images(_images(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_bad_images():
  encoder = image_lib.ImageEncoder(image_lib.init(CONFIG, 0))
  with pytest.raises(ValueError, match=r"uint8 of shape \(n, 16, 16, 1\)"):
    encoder.encode_images(_images(2).astype(np.float32))
  with pytest.raises(ValueError, match=r"uint8 of shape \(n, 16, 16, 1\)"):
    encoder.encode_images(np.zeros((2, 32, 32, 1), np.uint8))


def test_config_round_trip_and_missing_checkpoint(tmp_path):
  assert image_lib.TowerConfig.from_json(CONFIG.to_json()) == CONFIG
  with pytest.raises(FileNotFoundError, match="run `dprdm train-encoder` first"):
    image_lib.load(tmp_path)
