"""Poisson membership by a keyed PRF of record ids: Threefry, rate, independence, id-not-position."""

import jax
import numpy as np
import pytest
from scipy import stats

from dprdm_jax.privacy import keys
from dprdm_jax.retrieval import subsample


def sub_keys(n, first=0, seed=5):
  return keys.query_keys(seed, first, n, keys.Stream.SUBSAMPLE)


@pytest.mark.parametrize("q", [0.5, 0.01])
def test_rate_is_q_and_queries_are_independent(q):
  ids = np.arange(20_000, dtype=np.uint32)
  member = np.asarray(subsample.membership(sub_keys(50), ids, subsample.limit(q)))
  n = member.size
  assert abs(member.mean() - q) < 5 * np.sqrt(q * (1 - q) / n)
  # Subsample sizes per query are Binomial(N, q).
  sizes = member.sum(axis=1)
  standardised = (sizes - len(ids) * q) / np.sqrt(len(ids) * q * (1 - q))
  assert stats.kstest(standardised, "norm").pvalue > 1e-3
  # Two queries' memberships are independent: the joint rate is q^2.
  both = (member[:-1] & member[1:]).mean()
  assert abs(both - q * q) < 5 * np.sqrt(q * q / (member[1:].size)) + 1e-4


def test_q_one_keeps_everything_and_bad_rates_are_refused():
  ids = np.arange(1000, dtype=np.uint32)
  assert np.asarray(subsample.membership(sub_keys(3), ids, subsample.limit(1.0))).all()
  for q in (0.0, 1.5, -0.1, 1e-12):
    with pytest.raises(ValueError, match="sampling rate"):
      subsample.limit(q)


def test_membership_depends_on_the_id_not_the_position():
  ids = np.array([5, 900, 17, 2**32 - 1, 0], np.uint32)
  k = sub_keys(4)
  keep = subsample.limit(0.5)
  full = np.asarray(subsample.membership(k, ids, keep))
  perm = np.array([3, 0, 4, 1, 2])
  np.testing.assert_array_equal(np.asarray(subsample.membership(k, ids[perm], keep)), full[:, perm])
  cand = np.asarray(subsample.candidate_membership(k, np.tile(ids[::-1], (4, 1)), keep))
  np.testing.assert_array_equal(cand, full[:, ::-1])


def test_subsample_and_noise_streams_differ():
  ids = np.arange(5000, dtype=np.uint32)
  keep = subsample.limit(0.5)
  a = np.asarray(subsample.membership(sub_keys(2), ids, keep))
  b = np.asarray(subsample.membership(keys.query_keys(5, 0, 2, keys.Stream.NOISE), ids, keep))
  assert 0.4 < (a == b).mean() < 0.6


def test_the_hash_is_threefry_2x32_20():
  # Random123's known-answer vector for Threefry-2x32 with 20 rounds: key (0, 0), counter (0, 0)
  # gives (0x6b200159, 0x99ba4efe); h is the first word.
  word = subsample.hash_ids(jax.random.wrap_key_data(np.zeros(2, np.uint32)),
                            np.zeros(1, np.uint32))
  assert int(word[0]) == 0x6B200159
  # Each id is a block of its own: its value does not depend on which other ids are hashed.
  key = sub_keys(1)[0]
  ids = np.array([7, 3, 2**32 - 1, 0], np.uint32)
  alone = [int(subsample.hash_ids(key, ids[i:i + 1])[0]) for i in range(4)]
  assert np.asarray(subsample.hash_ids(key, ids)).tolist() == alone
  assert np.asarray(subsample.hash_ids(key, ids.reshape(2, 2))).reshape(-1).tolist() == alone


def test_hash_values_are_uniform_and_neighbouring_ids_independent():
  ids = np.arange(200_000, dtype=np.uint32)
  words = np.asarray(jax.vmap(lambda k: subsample.hash_ids(k, ids))(sub_keys(3)))
  for row in words:
    assert stats.kstest(row / 2.0**32, "uniform").pvalue > 1e-3
  q = 0.1
  member = words <= subsample.limit(q)
  pairs = member[:, :-1] & member[:, 1:]  # ids r and r + 1
  bound = 5 * np.sqrt(q * q / pairs.size)
  assert abs(pairs.mean() - q * q) < bound
  strided = member[:, :-1024] & member[:, 1024:]  # ids r and r + 1024
  assert abs(strided.mean() - q * q) < bound
