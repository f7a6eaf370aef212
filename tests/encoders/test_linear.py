"""The linear value embedding: principal directions of public images, unit rows, a prompt map."""

import numpy as np
import pytest

from dprdm_jax.encoders import linear


def images(n=200, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (4, 8, 8, 1))
  labels = rng.integers(0, 4, n)
  noise = rng.normal(0, 20, (n, 8, 8, 1))
  return np.clip(base[labels] + noise, 0, 255).astype(np.uint8), labels


def test_the_projection_is_the_top_principal_directions_and_rows_are_unit():
  x, labels = images()
  text = np.eye(4, dtype=np.float32)[labels]
  tower = linear.fit(x, text, dim=3)
  pixels = x.reshape(len(x), -1).astype(np.float64) / 127.5 - 1
  centred = pixels - pixels.mean(0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  # Same subspace as numpy's SVD (signs may differ): |cosines| of matched directions are 1.
  np.testing.assert_allclose(np.abs(np.sum(tower.components.T * vt[:3], axis=1)), 1, atol=1e-4)
  e = tower.encode_images(x)
  assert e.shape == (200, 3) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
  assert np.all(tower.components[np.abs(tower.components).argmax(0), range(3)] > 0)
  np.testing.assert_array_equal(linear.fit(x, text, dim=3).components, tower.components)


def test_the_prompt_map_lands_near_each_class_mean():
  x, labels = images()
  tower = linear.fit(x, np.eye(4, dtype=np.float32)[labels], dim=4)
  mapped = tower.encode_prompts(np.eye(4, dtype=np.float32))
  e = tower.encode_images(x)
  for c in range(4):
    mean = e[labels == c].mean(0)
    assert mapped[c] @ (mean / np.linalg.norm(mean)) > 0.99
  np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), 1, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
  x, labels = images()
  tower = linear.fit(x, np.eye(4, dtype=np.float32)[labels], dim=2)
  tower.save(tmp_path)
  loaded = linear.load(tmp_path)
  np.testing.assert_array_equal(loaded.encode_images(x), tower.encode_images(x))
  assert loaded.text_dim == 4 and loaded.dim == 2
  with pytest.raises(FileNotFoundError, match="train-encoder"):
    linear.load(tmp_path / "missing")


def test_bad_input_is_refused():
  x, labels = images()
  text = np.eye(4, dtype=np.float32)[labels]
  with pytest.raises(ValueError, match="dim must lie"):
    linear.fit(x, text, dim=0)
  with pytest.raises(ValueError, match="uint8"):
    linear.fit(x.astype(np.float32), text, dim=2)
  with pytest.raises(ValueError, match="one text embedding per image"):
    linear.fit(x, text[:5], dim=2)
  tower = linear.fit(x, text, dim=2)
  with pytest.raises(ValueError, match="uint8 of shape"):
    tower.encode_images(np.zeros((1, 4, 4, 1), np.uint8))
  with pytest.raises(ValueError, match="text embeddings must be"):
    tower.encode_prompts(np.zeros((1, 3), np.float32))
