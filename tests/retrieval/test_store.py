"""The embedding store: round trip, memory mapping, fingerprint, bad input."""

import json

import ml_dtypes
import numpy as np
import pytest

from dprdm_jax.retrieval import store as store_lib


def rows(n=50, d=8, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_memory_mapped_normalised_and_in_id_order(tmp_path, dtype):
  x = rows()
  ids = np.arange(50)[::-1] * 3 + 7  # descending on purpose
  payload = [f"caption {i}" for i in ids]
  written = store_lib.EmbeddingStore.write(tmp_path / "s", x, ids, payload, dtype, shard_rows=16)
  store = store_lib.EmbeddingStore(tmp_path / "s")
  assert len(store) == 50 and store.dim == 8 and store.dtype == dtype
  assert store.fingerprint == written.fingerprint
  order = np.argsort(ids)
  np.testing.assert_array_equal(store.ids, ids[order])
  expected = x[order] / np.linalg.norm(x[order], axis=1, keepdims=True)
  got = np.asarray(store.embeddings, np.float32)
  np.testing.assert_allclose(got, expected, atol=1e-6 if dtype == "float32" else 1e-2)
  assert store.payload == [payload[i] for i in order]
  assert len(list(tmp_path.glob("s/embeddings-*.npy"))) == 4  # 16 + 16 + 16 + 2 rows
  if dtype == "bfloat16":
    assert store.embeddings.dtype == ml_dtypes.bfloat16
  one = store_lib.EmbeddingStore.write(tmp_path / "one", x)
  assert isinstance(one.embeddings, np.memmap)


def test_fingerprint_is_stable_and_changes_with_any_row(tmp_path):
  x = rows()
  a = store_lib.EmbeddingStore.write(tmp_path / "a", x, shard_rows=7).fingerprint
  b = store_lib.EmbeddingStore.write(tmp_path / "b", x, shard_rows=50).fingerprint
  assert a == b  # sharding is a layout, not content
  changed = x.copy()
  changed[31, 2] += 0.5
  assert store_lib.EmbeddingStore.write(tmp_path / "c", changed).fingerprint != a
  other_ids = np.arange(50)
  other_ids[49] = 1000
  assert store_lib.EmbeddingStore.write(tmp_path / "d", x, other_ids).fingerprint != a
  assert store_lib.EmbeddingStore.write(tmp_path / "e", x, dtype="bfloat16").fingerprint != a


def test_tampered_data_is_detected_on_open(tmp_path):
  store = store_lib.EmbeddingStore.write(tmp_path / "s", rows())
  path = tmp_path / "s" / "embeddings-00000.npy"
  data = np.load(path)
  data[3, 0] = -data[3, 0]
  np.save(path, data)
  with pytest.raises(store_lib.StoreError, match="fingerprint"):
    store_lib.EmbeddingStore(store.directory)


@pytest.mark.parametrize("change,message", [
    (lambda x: x.__setitem__((4, 1), np.nan), "non-finite"),
    (lambda x: x.__setitem__((4, 1), np.inf), "non-finite"),
    (lambda x: x.__setitem__(7, 0.0), "zero vectors"),
])
def test_bad_rows_are_refused(tmp_path, change, message):
  x = rows()
  change(x)
  with pytest.raises(store_lib.StoreError, match=message):
    store_lib.EmbeddingStore.write(tmp_path / "s", x)


def test_bad_shapes_ids_and_directories_are_refused(tmp_path):
  with pytest.raises(store_lib.StoreError, match="2-D"):
    store_lib.EmbeddingStore.write(tmp_path / "a", np.ones(5, np.float32))
  with pytest.raises(store_lib.StoreError, match="unique"):
    store_lib.EmbeddingStore.write(tmp_path / "b", rows(3), np.array([1, 1, 2]))
  with pytest.raises(store_lib.StoreError, match=r"\[0, 2\*\*32\)"):
    store_lib.EmbeddingStore.write(tmp_path / "c", rows(2), np.array([0, 2**32]))
  with pytest.raises(store_lib.StoreError, match="ids must be"):
    store_lib.EmbeddingStore.write(tmp_path / "d", rows(3), np.array([0, 1]))
  with pytest.raises(store_lib.StoreError, match="payload"):
    store_lib.EmbeddingStore.write(tmp_path / "e", rows(3), payload=["a"])
  store_lib.EmbeddingStore.write(tmp_path / "f", rows(3))
  with pytest.raises(store_lib.StoreError, match="already holds"):
    store_lib.EmbeddingStore.write(tmp_path / "f", rows(3))
  with pytest.raises(store_lib.StoreError, match="not an embedding store"):
    store_lib.EmbeddingStore(tmp_path / "nothing")
  (tmp_path / "g").mkdir()
  (tmp_path / "g" / "manifest.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(store_lib.StoreError, match="not a version-1"):
    store_lib.EmbeddingStore(tmp_path / "g")


def test_written_shard_by_shard_it_equals_the_store_written_at_once(tmp_path):
  rng = np.random.default_rng(21)
  x = rng.normal(size=(250, 8)).astype(np.float32)
  ids = np.sort(rng.choice(10**6, 250, replace=False))
  whole = store_lib.EmbeddingStore.write(tmp_path / "whole", x, ids, shard_rows=100)
  parts = store_lib.EmbeddingStore.write_shards(
      tmp_path / "parts", ((ids[s:s + 60], x[s:s + 60]) for s in range(0, 250, 60)), 8)
  assert parts.fingerprint == whole.fingerprint and len(parts.shards) == 5
  np.testing.assert_array_equal(parts.ids, whole.ids)
  np.testing.assert_array_equal(parts.embeddings, whole.embeddings)
  np.testing.assert_array_equal(parts.take(np.array([249, 0, 61, 120])),
                                whole.embeddings[[249, 0, 61, 120]])
  for store in (parts, whole):  # 5 and 3 shards
    with pytest.raises(store_lib.StoreError, match=r"must be in \[0, 250\)"):
      store.take(np.array([3, 250]))
    with pytest.raises(store_lib.StoreError, match=r"must be in \[0, 250\)"):
      store.take(np.array([-1]))
  one = store_lib.EmbeddingStore.write(tmp_path / "one", x, ids)
  assert len(one.shards) == 1
  np.testing.assert_array_equal(one.take(np.array([249, 0, 61, 61])),
                                whole.embeddings[[249, 0, 61, 61]])
  assert one.take(np.array([], np.int64)).shape == (0, 8)
  with pytest.raises(store_lib.StoreError, match=r"must be in \[0, 250\)"):
    one.take(np.array([250]))
  with pytest.raises(store_lib.StoreError, match="do not ascend"):
    store_lib.EmbeddingStore.write_shards(
        tmp_path / "bad", [(ids[60:120], x[60:120]), (ids[:60], x[:60])], 8)
  with pytest.raises(store_lib.StoreError, match=r"not \(n, 8\)"):
    store_lib.EmbeddingStore.write_shards(tmp_path / "narrow", [(ids[:60], x[:60, :4])], 8)
  assert not (tmp_path / "bad" / "manifest.json").exists()
