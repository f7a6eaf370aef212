"""Private k-NN on the host (exact ScaNN + subsample filter): exact, equal to the device path."""

import jax
import numpy as np
import pytest

from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import host
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import store as store_lib
from tests.retrieval import reference as ref


def make(tmp_path, rows, ids, mode="exact"):
  store = store_lib.EmbeddingStore.write(tmp_path / "store", rows, ids)
  config = index_lib.index_config(len(ids))
  config.mode = mode
  return store, index_lib.ScannIndex.build(np.asarray(store.embeddings), store.ids, config)


def as_int_ids(found):
  return np.where(found.valid, np.asarray(found.ids).astype(np.int64), -1)


@pytest.mark.parametrize("q", [1.0, 0.5, 0.01])
@pytest.mark.parametrize("k", [1, 4, 64])
@pytest.mark.parametrize("d", [16, 256])
def test_exact_top_k_and_equal_to_the_device_path(tmp_path, q, k, d):
  rng = np.random.default_rng(int(q * 100) + k + d)
  n, b = 600, 6
  rows = ref.sign_rows(rng, n, d)
  rows[10:20] = rows[0]  # ties, to the lower id
  ids = np.sort(rng.choice(10**6, n, replace=False))
  queries = ref.sign_rows(rng, b, d)
  keys = ref.subsample_keys(b)
  store, index = make(tmp_path, rows, ids)
  found = host.HostRetriever(store, index).retrieve(queries, keys, q, k)
  expected_ids, expected_scores = ref.materialised_top_k(rows, ids, queries,
                                                          ref.members(ids, keys, q), k)
  np.testing.assert_array_equal(as_int_ids(found), expected_ids)
  np.testing.assert_array_equal(found.scores, expected_scores.astype(np.float32))
  on_device = jax.tree.map(np.asarray, device.private_knn(
      device.DeviceTable.from_store(store), queries, keys, q, k))
  for a, b_ in zip(found, on_device):
    np.testing.assert_array_equal(a, b_)


def test_enlarges_the_candidates_when_the_first_search_is_short(tmp_path):
  """A margin far too small forces repeated searches; the answer must not change."""
  rng = np.random.default_rng(5)
  rows = ref.sign_rows(rng, 500, 16)
  queries = ref.sign_rows(rng, 8, 16)
  keys = ref.subsample_keys(8)
  store, index = make(tmp_path, rows, np.arange(500))
  wide = host.HostRetriever(store, index, margin=50.0).retrieve(queries, keys, 0.1, 10)
  narrow = host.HostRetriever(store, index, margin=0.01).retrieve(queries, keys, 0.1, 10)
  np.testing.assert_array_equal(as_int_ids(narrow), as_int_ids(wide))
  expected, _ = ref.materialised_top_k(rows, np.arange(500), queries,
                                       ref.members(np.arange(500), keys, 0.1), 10)
  np.testing.assert_array_equal(as_int_ids(narrow), expected)


def test_private_retrieval_refuses_an_approximate_index(tmp_path):
  rng = np.random.default_rng(6)
  rows = rng.normal(size=(2000, 16)).astype(np.float32)
  store = store_lib.EmbeddingStore.write(tmp_path / "store", rows)
  config = index_lib.index_config(2000)
  config.mode = "fast"
  config.num_leaves, config.num_leaves_to_search, config.training_sample_size = 20, 5, 2000
  fast = index_lib.ScannIndex.build(np.asarray(store.embeddings), store.ids, config)
  assert not fast.is_exact
  with pytest.raises(host.PrivateRetrievalError, match="exact"):
    host.HostRetriever(store, fast)


def test_index_of_another_store_is_refused(tmp_path):
  rng = np.random.default_rng(7)
  rows = ref.sign_rows(rng, 50, 16)
  store, _ = make(tmp_path, rows, np.arange(50))
  other = index_lib.ScannIndex.build(np.asarray(store.embeddings), np.arange(50) + 1)
  with pytest.raises(host.PrivateRetrievalError, match="not built from this store"):
    host.HostRetriever(store, other)


def test_bfloat16_store_gives_the_same_neighbours_on_host_and_device(tmp_path):
  rng = np.random.default_rng(8)
  rows = rng.normal(size=(3000, 64)).astype(np.float32)
  store = store_lib.EmbeddingStore.write(tmp_path / "store", rows, dtype="bfloat16")
  config = index_lib.index_config(3000)
  config.mode = "exact"
  index = index_lib.ScannIndex.build(np.asarray(store.embeddings, np.float32), store.ids, config)
  queries = rng.normal(size=(32, 64)).astype(np.float32)
  keys = ref.subsample_keys(32)
  on_host = host.HostRetriever(store, index).retrieve(queries, keys, 0.05, 16)
  on_device = device.private_knn(device.DeviceTable.from_store(store), queries, keys, 0.05, 16)
  np.testing.assert_array_equal(as_int_ids(on_host), as_int_ids(on_device))
