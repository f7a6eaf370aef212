"""Test set-up: eight fake CPU devices, so sharded code runs on a mesh without accelerators, and
the tiny trained product that the end-to-end tests share.

XLA reads the flag when jax first starts, and pytest imports this file before any test module.
"""

import os
import pathlib

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


TINY_PRIVATE_RECORDS = 1000  # the tiny config's dataset_size


def _stores(directory: pathlib.Path, source, tower, text, center, n=None):
  """Caption-key and image-value stores of the first n records of source."""
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  rows = source.read(np.arange(n or len(source)))
  captions = text.encode_text(sorted(set(rows["caption"].tolist())), center=center)
  index = {c: i for i, c in enumerate(sorted(set(rows["caption"].tolist())))}
  keys = captions[[index[c] for c in rows["caption"]]]
  store_lib.EmbeddingStore.write(directory / "captions", keys, ids=rows["id"])
  store_lib.EmbeddingStore.write(directory / "images", tower.encode_images(rows["image"]),
                                 ids=rows["id"])
  return directory


@pytest.fixture(scope="session")
def tiny_product(tmp_path_factory):
  """The tiny config's towers (train-encoder), caption-key and image-value stores of 1,000
  Fashion-MNIST train records and of the public train split, an 8-step U-Net (`dprdm train`) and
  the evaluation classifier, all real; returns (root, the config overrides that point at them)."""
  # pylint: disable=g-import-not-at-top
  from dprdm_jax import train
  from dprdm_jax import train_encoder
  from dprdm_jax.data import offline
  from dprdm_jax.encoders import linear as linear_lib
  from dprdm_jax.encoders import text as text_lib
  from dprdm_jax.evaluate import classifier
  from tests.test_configs import load
  root = tmp_path_factory.mktemp("product")
  config = load("configs/default.py:tiny")
  train_encoder.train(config, root / "encoder")
  tower = linear_lib.load(root / "encoder")
  text = text_lib.TextEncoder.load()
  center = text.fit_center(list(offline.caption_vocabulary()))
  private = _stores(root / "private", offline.load("fashion_mnist", "train"), tower, text, center,
                    TINY_PRIVATE_RECORDS)
  public = _stores(root / "public", offline.load("public", "train"), tower, text, center)
  overrides = [f"--config.encoder.workdir={root / 'encoder'}",
               f"--config.train.embeddings={public / 'images'}",
               f"--config.train.workdir={root / 'unet'}",
               f"--config.generate.private_keys={private / 'captions'}",
               f"--config.generate.private_values={private / 'images'}",
               f"--config.generate.public_keys={public / 'captions'}",
               f"--config.generate.public_values={public / 'images'}",
               f"--config.classifier.workdir={root / 'classifier'}",
               "--config.diffusion.sample_steps=3"]
  config = load("configs/default.py:tiny", *overrides)
  train.train(config, root / "unet")
  classifier.train(config, root / "classifier")
  return root, overrides
