"""The aggregation kernel: noise (shape, scale, purity), sensitivity 2/k (R2), clipping,
sharding."""

import jax
import jax.extend
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dprdm_jax.privacy import aggregate as agg
from dprdm_jax.privacy import keys


def noise_keys(b, first=0, seed=1):
  return keys.query_keys(seed, first, b, keys.Stream.NOISE)


def run(neighbors, valid, queries, noise_std, interpolation=1.0, first=0, public=None):
  return np.asarray(agg.aggregate(neighbors, valid, queries, noise_keys(len(queries), first),
                                  noise_std, interpolation, public))


def test_noise_is_gaussian_with_scale_sigma():
  b, k, d, sigma = 2048, 4, 512, 0.37  # 2048 * 512 = 1,048,576 draws
  out = run(np.zeros((b, k, d), np.float32), np.zeros((b, k), bool), np.ones((b, d), np.float32),
            sigma)
  draws = out.reshape(-1) / sigma
  assert draws.size >= 10**6
  assert stats.kstest(draws, "norm").pvalue > 1e-3
  assert abs(out.std() / sigma - 1) < 0.01
  assert abs(draws.mean()) < 5 / np.sqrt(draws.size)


def test_same_key_same_noise_and_each_query_its_own():
  b, k, d = 64, 4, 32
  x = np.random.default_rng(0).normal(size=(b, k, d)).astype(np.float32)
  valid, q = np.ones((b, k), bool), np.ones((b, d), np.float32)
  first = run(x, valid, q, 0.5, first=1000)
  np.testing.assert_array_equal(first, run(x, valid, q, 0.5, first=1000))
  other = run(x, valid, q, 0.5, first=1000 + b)
  assert not np.allclose(first, other)
  # Same neighbours in every row: the rows' noise must still differ (one key per query, R3).
  same = np.broadcast_to(x[:1], x.shape)
  rows = run(same, valid, q, 0.5).reshape(b, d)
  assert len(np.unique(rows.round(6), axis=0)) == b


def exact_topk(db, sampled, query, k):
  """The exact top-k of the sampled rows of db by inner product (ties to the lower index)."""
  rows = np.flatnonzero(sampled)
  order = rows[np.lexsort((rows, -(db[rows] @ query)))][:k]
  neighbors = np.zeros((k, db.shape[1]), np.float32)
  neighbors[:len(order)] = db[order]
  valid = np.arange(k) < len(order)
  return neighbors, valid


@pytest.mark.parametrize("k,n,q", [(1, 50, 0.5), (4, 200, 0.3), (16, 40, 0.2), (16, 300, 1.0)])
def test_sensitivity_is_two_over_k_for_add_or_remove_one(k, n, q):
  """Neighbouring datasets (one record added), same subsample of the shared records."""
  rng = np.random.default_rng(k * 1000 + n)
  d, trials = 24, 150
  pairs = []
  for _ in range(trials):
    # Norms up to 10: without clipping a single slot could move the mean by 10/k.
    db = rng.normal(size=(n + 1, d)).astype(np.float32)
    db *= rng.uniform(0.1, 10, size=(n + 1, 1)).astype(np.float32)
    query = rng.normal(size=d).astype(np.float32)
    db[n] = query * 10  # the added record is the best match, the worst case
    sampled = rng.random(n + 1) < q
    sampled[n] = True
    pairs.append((exact_topk(db[:n], sampled[:n], query, k), exact_topk(db, sampled, query, k),
                  query))
  x = np.stack([p[0][0] for p in pairs] + [p[1][0] for p in pairs])
  v = np.stack([p[0][1] for p in pairs] + [p[1][1] for p in pairs])
  queries = np.stack([p[2] for p in pairs] * 2)
  if n * q < k:
    assert (~v).any()  # subsamples smaller than k: padded slots are exercised
  out = run(x, v, queries, 0.0).reshape(2, trials, d)
  gap = np.linalg.norm(out[0] - out[1], axis=-1)
  assert gap.max() <= 2 / k + 1e-5
  assert gap.max() > 0.5 / k  # the added record does change the result


def test_mean_divides_by_k_including_padded_slots():
  k, d = 8, 16
  x = np.zeros((1, k, d), np.float32)
  x[0, :3, 0] = 1.0
  valid = np.zeros((1, k), bool)
  valid[0, :3] = True
  x[0, 3:] = 5.0  # invalid slots hold garbage that must not count
  out = run(x, valid, np.ones((1, d), np.float32), 0.0)
  np.testing.assert_allclose(out[0, 0], np.eye(d)[0] * 3 / k, atol=1e-7)


def test_clip_bounds_norms_in_float32_and_bfloat16():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4096, 384)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)  # unit norm, then rounded to bfloat16
  for rows in (x, x * 7, jnp.asarray(x, jnp.bfloat16), jnp.asarray(x * 7, jnp.bfloat16)):
    norms = np.linalg.norm(np.asarray(agg.clip_to_unit_ball(rows), np.float64), axis=-1)
    assert norms.max() <= 1 + 1e-6
  bf16_norms = np.linalg.norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), axis=-1)
  assert bf16_norms.max() > 1  # rounding does push some above 1: the clip is needed
  small = x[:3] * 0.5
  np.testing.assert_allclose(agg.clip_to_unit_ball(small), small, rtol=1e-6)


def test_non_finite_neighbour_counts_as_zero():
  k, d = 4, 8
  x = np.zeros((1, k, d), np.float32)
  x[0, 0, 0] = 1.0
  x[0, 1, 2] = np.nan
  x[0, 2, 3] = np.inf
  out = run(x, np.ones((1, k), bool), np.ones((1, d), np.float32), 0.0)
  np.testing.assert_allclose(out[0, 0], np.eye(d)[0] / k, atol=1e-7)


def test_bfloat16_input_matches_float32_within_rounding():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(32, 16, 384)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  valid, q = np.ones((32, 16), bool), rng.normal(size=(32, 384)).astype(np.float32)
  f32 = run(x, valid, q, 0.1)
  bf16 = run(jnp.asarray(x, jnp.bfloat16), valid, jnp.asarray(q, jnp.bfloat16), 0.1)
  assert bf16.dtype == np.float32
  np.testing.assert_allclose(bf16, f32, atol=2e-3)


def test_interpolation_with_query_and_with_public_neighbours():
  rng = np.random.default_rng(5)
  b, k, d, lam = 6, 4, 10, 0.3
  x = rng.normal(size=(b, k, d)).astype(np.float32)
  valid = np.ones((b, k), bool)
  q = rng.normal(size=(b, d)).astype(np.float32)
  public = rng.normal(size=(b, k, d)).astype(np.float32)
  private = run(x, valid, q, 0.2, interpolation=1.0)  # the noisy mean alone
  assert private.shape == (b, 1, d)
  unit_q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  np.testing.assert_allclose(run(x, valid, q, 0.2, lam),
                             lam * private + (1 - lam) * unit_q[:, None], atol=1e-6)
  mixed = run(x, valid, q, 0.2, lam, public=public)
  assert mixed.shape == (b, k, d)
  np.testing.assert_allclose(mixed, lam * private + (1 - lam) * public, atol=1e-6)


def test_lambda_zero_reveals_nothing_private():
  rng = np.random.default_rng(6)
  q = rng.normal(size=(3, 8)).astype(np.float32)
  a = run(rng.normal(size=(3, 4, 8)).astype(np.float32), np.ones((3, 4), bool), q, 0.5, 0.0)
  b = run(rng.normal(size=(3, 4, 8)).astype(np.float32), np.ones((3, 4), bool), q, 0.5, 0.0)
  np.testing.assert_array_equal(a, b)


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match="shapes disagree"):
    run(np.zeros((2, 4, 8), np.float32), np.ones((2, 3), bool), np.ones((2, 8), np.float32), 0.1)
  with pytest.raises(ValueError, match="public_neighbors"):
    run(np.zeros((2, 4, 8), np.float32), np.ones((2, 4), bool), np.ones((2, 8), np.float32), 0.1,
        public=np.zeros((2, 3, 8), np.float32))


def test_sharded_batch_equals_unsharded():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(7)
  b, k, d = 64, 8, 32
  x = rng.normal(size=(b, k, d)).astype(np.float32)
  valid = rng.random((b, k)) < 0.8
  q = rng.normal(size=(b, d)).astype(np.float32)
  public = rng.normal(size=(b, k, d)).astype(np.float32)
  nk = noise_keys(b)
  rows = NamedSharding(mesh, P("data"))
  put = lambda a: jax.device_put(a, rows)
  for pub in (None, public):
    expected = agg.aggregate(x, valid, q, nk, 0.2, 0.7, pub)
    got = agg.aggregate(put(x), put(valid), put(q), put(nk), 0.2, 0.7,
                        None if pub is None else put(pub))
    assert got.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def test_block_size_changes_speed_not_results():
  rng = np.random.default_rng(8)
  b, k, d = 37, 8, 16
  x = rng.normal(size=(b, k, d)).astype(np.float32)
  valid = rng.random((b, k)) < 0.7
  q = rng.normal(size=(b, d)).astype(np.float32)
  nk = noise_keys(b)
  flat = np.asarray(agg.aggregate(x, valid, q, nk, 0.3, 0.6, block_size=None))
  for block in (1, 5, 16, -1):  # 5 and 16 leave a remainder block
    blocked = agg.aggregate(x, valid, q, nk, 0.3, 0.6, block_size=block)
    np.testing.assert_allclose(np.asarray(blocked), flat, atol=1e-6)
  assert agg.default_block_size(jnp.zeros((1024, 64, 512))) == 8
  assert agg.default_block_size(jnp.zeros((1024, 4, 384))) is None  # 6 MB: one pass


def _dot_precisions(fn, *args):
  """The precision of every dot_general in fn's jaxpr, nested calls included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_the_clipped_mean_is_summed_at_highest_precision():
  # On TPUs and Ampere-or-newer GPUs the default precision rounds the clipped rows to bf16/TF32,
  # which can lift the sum's norm, and so the sensitivity, above 2/k. CPUs ignore the setting, so
  # the program itself is checked.
  x, valid = jnp.ones((2, 4, 8)), jnp.ones((2, 4), bool)
  precisions = _dot_precisions(agg.clipped_mean, x, valid)
  highest = jax.lax.Precision.HIGHEST
  assert precisions and all(p == (highest, highest) for p in precisions), precisions
