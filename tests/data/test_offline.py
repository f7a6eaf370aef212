"""The offline default's datasets: counts, class balance, captions, ids, padding, safe
unpickling."""

import gzip
import pickle

import numpy as np
import pytest

from dprdm_jax.data import emoji
from dprdm_jax.data import offline
from dprdm_jax.data import source as source_lib

# (dataset, split): (records, records per class)
COUNTS = {
    ("mnist5k", "train"): (4500, 450), ("mnist5k", "test"): (500, 50),
    ("animal_mnist", "train"): (9000, 900), ("animal_mnist", "test"): (1000, 100),
    ("fashion_mnist", "train"): (60000, 6000), ("fashion_mnist", "test"): (10000, 1000),
    ("emoji_clothes", "train"): (2700, None), ("emoji_clothes", "test"): (300, None),
    ("public", "train"): (16200, None), ("public", "test"): (1800, None),
}


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_counts_balance_and_format(name, split):
  source = offline.load(name, split)
  total, per_class = COUNTS[(name, split)]
  assert len(source) == total
  counts = np.bincount(source.labels, minlength=len(source.class_names))
  if per_class is not None:
    assert counts.tolist() == [per_class] * 10
  elif name == "public":  # digits at 1/10 of the animals' count each, then the emoji
    assert counts[:10].tolist() == [per_class_of(name, split, "mnist5k")] * 10
    assert counts[10:20].tolist() == [per_class_of(name, split, "animal_mnist")] * 10
    np.testing.assert_array_equal(counts[20:], emoji_counts(split))
  else:
    np.testing.assert_array_equal(counts, emoji_counts(split))
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


def emoji_counts(split):
  """60 variants per emoji set that draws the class (Noto: all 30; gemojione: 20), 10% test."""
  sets = np.array([2] * 5 + [1, 1, 1, 1, 1, 1, 2, 1, 2, 2, 2, 2, 2, 2, 2, 1, 1] + [2] * 6
                  + [1, 2])
  return sets * (6 if split == "test" else 54)


def test_emoji_images_are_deterministic_and_look_like_the_other_sets():
  train = offline.load("emoji_clothes", "train")
  np.testing.assert_array_equal(emoji.raw()[0][:5], offline._raw("emoji_clothes")[0][:5])
  emoji.raw.cache_clear()
  np.testing.assert_array_equal(offline.load("emoji_clothes", "train").images, train.images)
  # Variants of one drawing differ (augmented), and each is white-on-black: a dark border row
  # and column, a bright item.
  first, second = train.images[0, 2:30, 2:30, 0], train.images[1, 2:30, 2:30, 0]
  assert not np.array_equal(first, second)
  items = train.images[:, 2:30, 2:30, 0].astype(np.float32)
  assert (items.max(axis=(1, 2)) >= 150).all()
  corners = items[:, [0, 0, -1, -1], [0, -1, 0, -1]]
  assert np.median(corners) == 0
  # Captions are the emoji's CLDR names.
  assert train.captions[0] == "a t-shirt emoji"
  assert "a one-piece swimsuit emoji" in offline.class_captions("emoji_clothes")


def test_missing_emoji_packages(tmp_path, monkeypatch):
  monkeypatch.setattr(emoji, "ROOTS", (tmp_path,))
  emoji.raw.cache_clear()
  with pytest.raises(source_lib.SourceError, match="fonts-noto-color-emoji"):
    emoji.raw()
  emoji.raw.cache_clear()


def test_captions():
  assert offline.class_captions("mnist5k")[7] == "a handwritten digit seven"
  assert offline.class_captions("animal_mnist")[9] == "a silhouette of a zebra"
  assert offline.class_captions("animal_mnist")[5] == "a silhouette of an elephant"
  assert offline.class_captions("fashion_mnist")[7] == "a photo of a sneaker"
  assert offline.class_captions("fashion_mnist")[9] == "a photo of an ankle boot"
  vocabulary = offline.caption_vocabulary()
  assert len(vocabulary) == len(set(vocabulary)) == 60


def test_ids_are_stable_disjoint_and_deterministic():
  train, test = offline.load("mnist5k", "train"), offline.load("mnist5k", "test")
  assert set(train.ids.tolist()).isdisjoint(test.ids.tolist())
  assert sorted(train.ids.tolist() + test.ids.tolist()) == list(range(5000))
  assert (test.ids % 10 == 9).all()
  public = offline.load("public", "test")
  animals = offline.load("animal_mnist", "test")
  # Animals follow the 5,000 digit ids in every split.
  emoji_test = offline.load("emoji_clothes", "test")
  animal_rows = slice(len(test), len(test) + len(animals))
  np.testing.assert_array_equal(public.ids[animal_rows], animals.ids.astype(np.int64) + 5000)
  np.testing.assert_array_equal(public.labels[animal_rows], animals.labels + 10)
  # The emoji follow the 15,000 digits and animals.
  np.testing.assert_array_equal(public.ids[animal_rows.stop:],
                                emoji_test.ids.astype(np.int64) + 15000)
  np.testing.assert_array_equal(public.labels[animal_rows.stop:], emoji_test.labels + 20)
  assert (emoji_test.ids % 10 == 9).all()
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
