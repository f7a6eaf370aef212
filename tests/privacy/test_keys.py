"""R3: per-query keys are pure functions of (seed, nonce, stream, query number) and never collide."""

import jax
import numpy as np
import pytest

from dprdm_jax.privacy import keys


def data(k):
  return np.asarray(jax.random.key_data(k))


def test_key_of_a_query_does_not_depend_on_the_batch_layout():
  batch = keys.query_keys(7, 100, 16, keys.Stream.NOISE)
  for i in range(16):
    np.testing.assert_array_equal(data(batch[i]),
                                  data(keys.query_keys(7, 100 + i, 1, keys.Stream.NOISE)[0]))


def test_keys_are_distinct_across_queries_streams_and_seeds():
  blocks = [keys.query_keys(seed, 0, 5000, stream)
            for seed in (0, 1, 2**64 - 1) for stream in keys.Stream]
  rows = np.concatenate([data(b) for b in blocks])
  assert len(np.unique(rows, axis=0)) == len(rows)


def test_the_grant_nonce_gives_the_same_query_numbers_fresh_keys():
  # What keeps a copied or rolled-back ledger from reissuing keys (ledger tests): the same seed
  # and query numbers under another nonce share no key, and both nonce words count.
  blocks = [keys.query_keys(7, 0, 1000, stream, nonce=nonce)
            for nonce in (0, 1, 2**32, 2**64 - 1) for stream in keys.Stream]
  rows = np.concatenate([data(b) for b in blocks])
  assert len(np.unique(rows, axis=0)) == len(rows)
  for bad in (-1, 2**64):
    with pytest.raises(ValueError, match="nonce"):
      keys.query_keys(7, 0, 1, keys.Stream.NOISE, nonce=bad)


def test_high_word_of_the_query_number_is_used():
  low = data(keys.query_keys(3, 5, 1, keys.Stream.NOISE))
  high = data(keys.query_keys(3, 2**32 + 5, 1, keys.Stream.NOISE))
  assert not np.array_equal(low, high)
  top = keys.query_keys(3, 2**64 - 2, 2, keys.Stream.NOISE)
  assert not np.array_equal(data(top[0]), data(top[1]))


def test_mask_and_noise_streams_are_independent():
  n = 200_000
  sub = keys.query_keys(11, 0, n, keys.Stream.SUBSAMPLE)
  noise = keys.query_keys(11, 0, n, keys.Stream.NOISE)
  u = np.asarray(jax.vmap(jax.random.uniform)(sub))
  z = np.asarray(jax.vmap(jax.random.normal)(noise))
  # Independent streams: correlation within 5 standard errors of zero, also for |z| (dependence in
  # scale) and for the next query's draw (a stream shifted by one query).
  bound = 5 / np.sqrt(n)
  assert abs(np.corrcoef(u, z)[0, 1]) < bound
  assert abs(np.corrcoef(u, np.abs(z))[0, 1]) < bound
  assert abs(np.corrcoef(u[1:], z[:-1])[0, 1]) < bound


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_bad_seed_is_refused(seed):
  with pytest.raises(ValueError, match="seed"):
    keys.root_key(seed)


def test_bad_ranges_are_refused():
  with pytest.raises(ValueError, match="count"):
    keys.query_keys(0, 0, 0, keys.Stream.NOISE)
  with pytest.raises(ValueError, match="query numbers"):
    keys.query_keys(0, 2**64 - 1, 2, keys.Stream.NOISE)
  with pytest.raises(ValueError, match="query numbers"):
    keys.query_keys(0, -1, 1, keys.Stream.NOISE)
