"""The offline default's datasets: counts, class balance, captions, ids, padding, safe
unpickling."""

import gzip
import pickle

import numpy as np
import pytest

from dprdm_jax.data import offline
from dprdm_jax.data import source as source_lib

# (dataset, split): (records, records per class)
COUNTS = {
    ("mnist5k", "train"): (4500, 450), ("mnist5k", "test"): (500, 50),
    ("animal_mnist", "train"): (9000, 900), ("animal_mnist", "test"): (1000, 100),
    ("fashion_mnist", "train"): (60000, 6000), ("fashion_mnist", "test"): (10000, 1000),
    ("public", "train"): (13500, None), ("public", "test"): (1500, None),
}


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_counts_balance_and_format(name, split):
  source = offline.load(name, split)
  total, per_class = COUNTS[(name, split)]
  assert len(source) == total
  counts = np.bincount(source.labels, minlength=len(source.class_names))
  if per_class is not None:
    assert counts.tolist() == [per_class] * 10
  else:  # digits at 1/10 of the animals' count each
    assert counts[:10].tolist() == [per_class_of(name, split, "mnist5k")] * 10
    assert counts[10:].tolist() == [per_class_of(name, split, "animal_mnist")] * 10
  batch = source.read(np.array([0, total - 1, 0]))
  assert batch["image"].shape == (3, 32, 32, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["id"].dtype == np.uint32
  assert batch["id"][0] == batch["id"][2]
  captions = offline.class_captions(name)
  assert [captions[l] for l in batch["label"]] == list(batch["caption"])
  # 28x28 centred in 32x32: a two-pixel zero border; the content is not blank.
  assert not source.images[:, :2].any() and not source.images[:, -2:].any()
  assert not source.images[:, :, :2].any() and not source.images[:, :, -2:].any()
  assert source.images.mean() > 10


def per_class_of(name, split, part):
  return COUNTS[(part, split)][1]


def test_captions():
  assert offline.class_captions("mnist5k")[7] == "a handwritten digit seven"
  assert offline.class_captions("animal_mnist")[9] == "a silhouette of a zebra"
  assert offline.class_captions("animal_mnist")[5] == "a silhouette of an elephant"
  assert offline.class_captions("fashion_mnist")[7] == "a photo of a sneaker"
  assert offline.class_captions("fashion_mnist")[9] == "a photo of an ankle boot"
  vocabulary = offline.caption_vocabulary()
  assert len(vocabulary) == len(set(vocabulary)) == 30


def test_ids_are_stable_disjoint_and_deterministic():
  train, test = offline.load("mnist5k", "train"), offline.load("mnist5k", "test")
  assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
  assert sorted(train.ids.tolist() + test.ids.tolist()) == list(range(5000))
  assert (test.ids % 10 == 9).all()
  public = offline.load("public", "test")
  animals = offline.load("animal_mnist", "test")
  # Animals follow the 5,000 digit ids in every split.
  np.testing.assert_array_equal(public.ids[len(test):], animals.ids.astype(np.int64) + 5000)
  np.testing.assert_array_equal(public.labels[len(test):], animals.labels + 10)
  again = offline.load("fashion_mnist", "test")
  np.testing.assert_array_equal(again.ids, np.arange(10000))
  np.testing.assert_array_equal(again.images, offline.load("fashion_mnist", "test").images)


def test_fashion_train_and_test_differ():
  train, test = offline.load("fashion_mnist", "train"), offline.load("fashion_mnist", "test")
  assert not np.array_equal(train.images[:100], test.images[:100])


def test_bad_requests():
  with pytest.raises(source_lib.SourceError, match="unknown offline dataset"):
    offline.load("cifar", "train")
  with pytest.raises(source_lib.SourceError, match="unknown split"):
    offline.load("mnist5k", "validation")
  with pytest.raises(source_lib.SourceError, match="larger than the resolution"):
    offline.load("mnist5k", "test", resolution=16)
  with pytest.raises(source_lib.SourceError, match=r"positions must lie in \[0, 500\)"):
    offline.load("mnist5k", "test").read(np.array([500]))


def test_unpickler_refuses_code(tmp_path):
  path = tmp_path / "evil.gz"

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  with gzip.open(path, "wb") as f:
    pickle.dump(Evil(), f)
  with pytest.raises(pickle.UnpicklingError, match="not a numpy array"):
    offline._unpickle_array(path)
  with gzip.open(path, "wb") as f:
    pickle.dump(np.arange(4, dtype=np.uint8), f)
  np.testing.assert_array_equal(offline._unpickle_array(path), np.arange(4))


def test_missing_fashion_package(tmp_path, monkeypatch):
  monkeypatch.setattr(offline, "FASHION_MNIST_DIR", tmp_path)
  with pytest.raises(source_lib.SourceError, match="dataset-fashion-mnist"):
    offline.load("fashion_mnist", "test")
