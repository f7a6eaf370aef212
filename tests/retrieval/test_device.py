"""Private k-NN on device: exact top-k of the subsample (R1), sharded equals unsharded."""

import inspect

import jax
import numpy as np
import pytest

from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import aggregate
from dprdm_jax.privacy import keys
from dprdm_jax.privacy import ledger
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import subsample
from tests.retrieval import reference as ref


def run(table_rows, ids, queries, q, k, sub_keys, mesh=None):
  table = device.DeviceTable.from_arrays(table_rows, ids, mesh, None if mesh is None else "rows")
  if mesh is None:
    found = device.private_knn(table, queries, sub_keys, q, k)
  else:
    found = device.sharded_private_knn(mesh, "rows", q, k)(table, queries, sub_keys)
  return jax.tree.map(np.asarray, found)


def as_int_ids(found):
  return np.where(found.valid, found.ids.astype(np.int64), -1)


@pytest.mark.parametrize("q", [1.0, 0.5, 0.01])
@pytest.mark.parametrize("k", [1, 4, 64])
@pytest.mark.parametrize("d", [8, 384])
def test_exact_top_k_of_the_materialised_subsample(q, k, d):
  rng = np.random.default_rng(int(q * 100) + k + d)
  n, b = 600, 6
  rows = ref.integer_rows(rng, n, d)
  rows[10:20] = rows[0]  # exact duplicates: ties that must go to the lower id
  ids = np.sort(rng.choice(10**6, n, replace=False))
  queries = ref.integer_rows(rng, b, d)
  keys = ref.subsample_keys(b)
  expected_ids, expected_scores = ref.materialised_top_k(rows, ids, queries,
                                                          ref.members(ids, keys, q), k)
  found = run(rows, ids, queries, q, k, keys)
  np.testing.assert_array_equal(as_int_ids(found), expected_ids)
  np.testing.assert_array_equal(found.scores, expected_scores.astype(np.float32))
  np.testing.assert_array_equal(found.embeddings[found.valid],
                                rows[np.searchsorted(ids, expected_ids[found.valid])])
  assert not found.embeddings[~found.valid].any()
  if q == 0.01 and k == 64:
    assert (~found.valid).any()  # subsamples of about 6 records: padded slots


def test_unsampled_records_cannot_change_the_result():
  rng = np.random.default_rng(1)
  n, d, k, q = 400, 16, 8, 0.1
  rows = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.arange(n) * 2
  queries = rng.normal(size=(1, d)).astype(np.float32)
  keys = ref.subsample_keys(1, first=77)
  base = run(rows, ids, queries, q, k, keys)
  outside = ~ref.members(ids, keys, q)[0]
  changed = rows.copy()
  changed[outside] = queries[0] * 100  # unsampled records made perfect matches
  np.testing.assert_array_equal(as_int_ids(run(changed, ids, queries, q, k, keys)),
                                as_int_ids(base))
  kept = ~outside
  deleted = run(rows[kept], ids[kept], queries, q, k, keys)
  np.testing.assert_array_equal(as_int_ids(deleted), as_int_ids(base))
  np.testing.assert_array_equal(deleted.embeddings, base.embeddings)


def test_adding_one_record_changes_at_most_one_slot():
  rng = np.random.default_rng(2)
  n, d, k, q, b = 300, 16, 8, 0.2, 40
  rows = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.arange(n) * 2
  queries = rng.normal(size=(b, d)).astype(np.float32)
  keys = ref.subsample_keys(b)
  base = as_int_ids(run(rows, ids, queries, q, k, keys))
  new_id = 301  # between existing ids: every later record shifts position
  at = np.searchsorted(ids, new_id)
  for new_row in (queries[0] * 10, rng.normal(size=d).astype(np.float32)):
    grown = run(np.insert(rows, at, new_row, axis=0), np.insert(ids, at, new_id), queries, q, k,
                keys)
    for before, after in zip(base, as_int_ids(grown)):
      assert len(set(before) - set(after)) <= 1
      assert set(after) - set(before) <= {new_id}


@pytest.mark.parametrize("spacing", [3, 1], ids=["scattered ids", "ids 0..N-1"])
def test_sharded_equals_unsharded_on_eight_devices(spacing):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(3)
  n, d, b = 605, 32, 5  # not a multiple of 8: padding rows must never be retrieved
  rows = ref.integer_rows(rng, n, d)
  rows[100:110] = rows[600]  # ties across shards
  ids = np.arange(n) * spacing
  queries = ref.integer_rows(rng, b, d)
  keys = ref.subsample_keys(b)
  # A store's ids 0..N-1 stay in aligned runs of 4 in every shard, padding included, so each
  # shard hashes a block per 4 records.
  table = device.DeviceTable.from_arrays(rows, ids, mesh, "rows")
  shard_ids = np.asarray(table.ids).reshape(8, -1)
  assert all(subsample.dense_ids(s) for s in shard_ids) == (spacing == 1)
  for q, k in ((1.0, 16), (0.3, 4), (0.01, 100)):
    single = run(rows, ids, queries, q, k, keys)
    sharded = run(rows, ids, queries, q, k, keys, mesh=mesh)
    for a, s in zip(single, sharded):
      np.testing.assert_array_equal(a, s)
    want_ids, _ = ref.materialised_top_k(rows, ids, queries, ref.members(ids, keys, q), k)
    np.testing.assert_array_equal(np.where(single[2], single[1].astype(np.int64), -1), want_ids)


def test_private_retrieval_has_no_approximate_mode():
  """R1: an approximate top k depends on unsampled records' positions, so none is offered."""
  for fn in (device.private_knn, device.sharded_private_knn):
    assert "approximate" not in inspect.signature(fn).parameters


def test_charged_query_runs_retrieval_and_aggregation_in_one_jit(tmp_path):
  """The whole private step of a query: ledger charge, keys, retrieval, noisy context."""
  rng = np.random.default_rng(8)
  n, d, b = 1000, 32, 4
  rows = rng.normal(size=(n, d)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  table = device.DeviceTable.from_arrays(rows, np.arange(n))
  mechanism = accounting.Mechanism(noise_std=0.5, sampling_rate=0.2, num_neighbors=8)  # z = 2
  with ledger.Ledger(tmp_path / "ledger.db", create=True) as book:
    book.register("fp", 5.0, 1e-3, "rdp")
    grant = book.charge("fp", mechanism, b)
  queries = rng.normal(size=(b, d)).astype(np.float32)

  @jax.jit
  def private_context(table, queries, sub_keys, noise_keys):
    found = device.private_knn(table, queries, sub_keys, mechanism.sampling_rate,
                               mechanism.num_neighbors)
    return aggregate.aggregate(found.embeddings, found.valid, queries, noise_keys,
                               mechanism.noise_std, 1.0), found

  context, found = private_context(table, queries, grant.keys(keys.Stream.SUBSAMPLE),
                                   grant.keys(keys.Stream.NOISE))
  assert context.shape == (b, 1, d)
  noiseless = aggregate.aggregate(found.embeddings, found.valid, queries,
                                  grant.keys(keys.Stream.NOISE), 0.0, 1.0)
  noise = np.asarray(context - noiseless).ravel() / mechanism.noise_std
  assert 0.8 < noise.std() < 1.2  # the noise of sigma is there


def test_table_ids_are_checked():
  rows = np.ones((3, 4), np.float32)
  for bad in ([2, 1, 3], [1, 1, 2], [0, 1, 2**32], [-1, 0, 1]):
    with pytest.raises(ValueError, match="ascending"):
      device.DeviceTable.from_arrays(rows, np.array(bad))
  with pytest.raises(ValueError, match="3 rows but 2 ids"):
    device.DeviceTable.from_arrays(rows, np.array([0, 1]))


def test_scores_are_computed_at_highest_precision():
  from tests.privacy.test_aggregate import _dot_precisions  # pylint: disable=g-import-not-at-top
  table = device.DeviceTable.from_arrays(np.eye(8, dtype=np.float32), np.arange(8))
  queries = np.ones((2, 8), np.float32)
  fn = lambda t, q, k: device.private_knn(t, q, k, 0.5, 2)
  precisions = _dot_precisions(fn, table, queries, keys.query_keys(0, 0, 2, keys.Stream.SUBSAMPLE))
  highest = jax.lax.Precision.HIGHEST
  assert precisions and all(p == (highest, highest) for p in precisions), precisions
