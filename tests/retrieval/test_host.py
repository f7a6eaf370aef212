"""Private k-NN on the host (the scan, or exact ScaNN + filter): exact, equal to device."""

import threading
import time

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


@pytest.mark.parametrize("method", ["scan", "scann"])
@pytest.mark.parametrize("q", [1.0, 0.5, 0.01])
@pytest.mark.parametrize("k", [1, 4, 64])
@pytest.mark.parametrize("d", [16, 256])
def test_exact_top_k_and_equal_to_the_device_path(tmp_path, q, k, d, method):
  rng = np.random.default_rng(int(q * 100) + k + d)
  n, b = 600, 6
  rows = ref.sign_rows(rng, n, d)
  rows[10:20] = rows[0]  # ties, to the lower id
  ids = np.sort(rng.choice(10**6, n, replace=False))
  queries = ref.sign_rows(rng, b, d)
  keys = ref.subsample_keys(b)
  store, index = make(tmp_path, rows, ids)
  found = host.HostRetriever(store, index, method=method).retrieve(queries, keys, q, k)
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


@pytest.mark.parametrize("method", ["scan", "scann"])
def test_bfloat16_store_gives_the_same_neighbours_on_host_and_device(tmp_path, method):
  rng = np.random.default_rng(8)
  rows = rng.normal(size=(3000, 64)).astype(np.float32)
  store = store_lib.EmbeddingStore.write(tmp_path / "store", rows, dtype="bfloat16")
  config = index_lib.index_config(3000)
  config.mode = "exact"
  index = index_lib.ScannIndex.build(np.asarray(store.embeddings, np.float32), store.ids, config)
  queries = rng.normal(size=(32, 64)).astype(np.float32)
  keys = ref.subsample_keys(32)
  on_host = host.HostRetriever(store, index, method=method).retrieve(queries, keys, 0.05, 16)
  on_device = device.private_knn(device.DeviceTable.from_store(store), queries, keys, 0.05, 16)
  np.testing.assert_array_equal(as_int_ids(on_host), as_int_ids(on_device))


@pytest.mark.parametrize("job_rows,tile_rows", [(1, 4), (64, 12), (1000, 64), (4096, 4096)])
@pytest.mark.parametrize("id_layout", ["scattered", "dense", "dense from 2"])
def test_scan_over_jobs_and_tiles_is_the_exact_top_k_of_the_materialised_subsample(
    job_rows, tile_rows, id_layout):
  """Jobs and tiles of any size (partial ones included), over ids that hash one by one or four
  to a block (and runs that start off a multiple of 4), give the brute-force answer, ties too."""
  rng = np.random.default_rng(9)
  n, d, b, k, q = 1000, 16, 7, 8, 0.1
  rows = ref.sign_rows(rng, n, d)
  rows[300:340] = rows[5]  # ties across jobs, to the lower id
  ids = {"scattered": np.sort(rng.choice(2**32, n, replace=False)), "dense": np.arange(n),
         "dense from 2": np.arange(n) + 2}[id_layout]
  queries = ref.sign_rows(rng, b, d)
  queries[0] = rows[5]
  keys = ref.subsample_keys(b, first=3)
  positions, scores = host.scan_top_k(rows, ids, queries, keys, q, k, job_rows=job_rows,
                                      tile_rows=tile_rows)
  expected_ids, expected_scores = ref.materialised_top_k(rows, ids, queries,
                                                          ref.members(ids, keys, q), k)
  valid = scores > -np.inf
  np.testing.assert_array_equal(np.where(valid, ids[positions], -1), expected_ids)
  np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_jobs_run_on_the_caller_and_the_pool_in_order_and_failures_surface(monkeypatch, workers):
  """Every part's result in its place whoever ran it; a failing job raises in the caller only
  after the pool's threads are done (no job left running over the caller's arrays)."""
  monkeypatch.setattr(host, "_WORKERS", workers)
  threads = set()

  def job(i, square):
    threads.add(threading.get_ident())
    time.sleep(0.002)
    return i * i if square else i

  parts = [(i, True) for i in range(40)]
  assert host._run_jobs(job, parts) == [i * i for i in range(40)]
  assert threading.get_ident() in threads and len(threads) <= workers
  finished = []

  def failing(i):
    if i == 3:
      raise ValueError("job 3 failed")
    time.sleep(0.01)
    finished.append(i)

  with pytest.raises(ValueError, match="job 3 failed"):
    host._run_jobs(failing, [(i,) for i in range(8)])
  done = len(finished)
  time.sleep(0.05)
  assert len(finished) == done  # nothing still ran after the caller saw the error


def test_scan_ignores_unsampled_records():
  """R1: unsampled records made perfect matches, or deleted, change nothing; an empty subsample
  gives no neighbours."""
  rng = np.random.default_rng(10)
  n, d, k, q = 700, 16, 8, 0.05
  rows = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.arange(n) * 3
  queries = rng.normal(size=(2, d)).astype(np.float32)
  keys = ref.subsample_keys(2, first=41)
  base_positions, base_scores = host.scan_top_k(rows, ids, queries, keys, q, k, job_rows=128)
  outside = ~(ref.members(ids, keys, q).any(axis=0))
  changed = rows.copy()
  changed[outside] = queries[0] * 100
  positions, scores = host.scan_top_k(changed, ids, queries, keys, q, k, job_rows=128)
  np.testing.assert_array_equal(positions, base_positions)
  np.testing.assert_array_equal(scores, base_scores)
  kept = ~outside
  positions, scores = host.scan_top_k(rows[kept], ids[kept], queries, keys, q, k, job_rows=128)
  np.testing.assert_array_equal(ids[kept][positions], ids[base_positions])
  np.testing.assert_array_equal(scores, base_scores)
  positions, scores = host.scan_top_k(rows[:3], ids[:3], queries, keys, 2.0**-32, k)
  assert (scores == -np.inf).all() and not positions.any()


def test_descending_keys_order_by_score_then_position():
  rng = np.random.default_rng(11)
  scores = rng.choice(np.array([-np.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, 3e38, np.inf],
                               np.float32), size=500)
  positions = rng.choice(2**32, 500, replace=False).astype(np.int64)
  # pylint: disable=protected-access
  keys = host._descending_keys(scores, positions)
  order = np.argsort(keys)
  np.testing.assert_array_equal(order, np.lexsort((positions, -scores.astype(np.float64))))
  np.testing.assert_array_equal(host._decode_scores(keys), scores)
  np.testing.assert_array_equal(keys & np.uint64(2**32 - 1), positions.astype(np.uint64))


def test_bad_method_and_queries_are_refused(tmp_path):
  rng = np.random.default_rng(12)
  store, index = make(tmp_path, ref.sign_rows(rng, 50, 16), np.arange(50))
  with pytest.raises(ValueError, match="method"):
    host.HostRetriever(store, index, method="dense")
  retriever = host.HostRetriever(store, index)
  queries = ref.sign_rows(rng, 2, 16)
  queries[1, 3] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    retriever.retrieve(queries, ref.subsample_keys(2), 0.01, 4)
  with pytest.raises(ValueError, match="shape"):
    retriever.retrieve(queries[:, :8], ref.subsample_keys(2), 0.01, 4)


def test_auto_picks_the_scan_at_small_rates_and_both_agree(tmp_path, monkeypatch):
  rng = np.random.default_rng(13)
  rows = rng.normal(size=(2000, 32)).astype(np.float32)
  store, index = make(tmp_path, rows, np.arange(2000))
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  keys = ref.subsample_keys(5)
  calls = []
  original = host.scan_top_k
  monkeypatch.setattr(host, "scan_top_k", lambda *a, **kw: calls.append(1) or original(*a, **kw))
  for q in (0.01, host.SCAN_MAX_RATE, 0.2):
    calls.clear()
    auto = host.HostRetriever(store, index).retrieve(queries, keys, q, 10)
    assert bool(calls) == (q <= host.SCAN_MAX_RATE)
    scann = host.HostRetriever(store, index, method="scann").retrieve(queries, keys, q, 10)
    np.testing.assert_array_equal(as_int_ids(auto), as_int_ids(scann))


def test_without_an_index_the_scan_answers_and_scann_is_refused(tmp_path):
  rng = np.random.default_rng(14)
  rows = rng.normal(size=(3000, 16)).astype(np.float32)
  store, index = make(tmp_path, rows, np.arange(3000))
  queries = rng.normal(size=(4, 16)).astype(np.float32)
  keys = ref.subsample_keys(4)
  for q in (0.02, 0.3):  # "auto" scans at every rate when there is no index
    alone = host.HostRetriever(store).retrieve(queries, keys, q, 8)
    with_index = host.HostRetriever(store, index, method="scann").retrieve(queries, keys, q, 8)
    np.testing.assert_array_equal(as_int_ids(alone), as_int_ids(with_index))
  with pytest.raises(ValueError, match="needs an exact ScaNN index"):
    host.HostRetriever(store, method="scann")


@pytest.mark.parametrize("method", ["scan", "scann"])
def test_values_come_from_the_values_store_as_on_device(tmp_path, method):
  """Keys in one store, values (another width) in another of the same records: the neighbours
  are the keys' top k, their embeddings the values' rows, as a DeviceTable with values gives."""
  rng = np.random.default_rng(15)
  n, b, d, dv, q, k = 800, 5, 16, 8, 0.2, 6
  ids = np.sort(rng.choice(10**6, n, replace=False))
  keys_rows = ref.sign_rows(rng, n, d)
  values_rows = rng.normal(size=(n, dv)).astype(np.float32)
  store, index = make(tmp_path, keys_rows, ids)
  values = store_lib.EmbeddingStore.write(tmp_path / "values", values_rows, ids)
  queries = ref.sign_rows(rng, b, d)
  keys = ref.subsample_keys(b)
  found = host.HostRetriever(store, index, method=method, values=values).retrieve(
      queries, keys, q, k)
  on_device = jax.tree.map(np.asarray, device.private_knn(
      device.DeviceTable.from_arrays(np.asarray(store.embeddings), store.ids,
                                     values=np.asarray(values.embeddings)), queries, keys, q, k))
  for a, b_ in zip(found, on_device):
    np.testing.assert_array_equal(a, b_)
  assert found.embeddings.shape == (b, k, dv) and found.valid.all()
  position = np.searchsorted(ids, found.ids.astype(np.int64))
  np.testing.assert_array_equal(found.embeddings, np.asarray(values.embeddings)[position])
  other = store_lib.EmbeddingStore.write(tmp_path / "other", values_rows, ids + 1)
  with pytest.raises(ValueError, match="other records"):
    host.HostRetriever(store, values=other)
