"""Poisson membership by a keyed PRF of record ids: Threefry, rate, independence, id-not-position."""

import jax
from jax.extend import random as jax_random
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


def test_the_blocks_are_threefry_2x32_20():
  # Random123's known-answer vector for Threefry-2x32 with 20 rounds: key (0, 0), counter (0, 0)
  # gives (0x6b200159, 0x99ba4efe).
  lanes = subsample._lanes(jax.random.wrap_key_data(np.zeros(2, np.uint32)),  # pylint: disable=protected-access
                           np.zeros(1, np.uint32), 0)
  assert np.asarray(lanes).tolist() == [[0x0159, 0x6B20, 0x4EFE, 0x99BA]]


def _spec_hash(key, r):
  """h(t, r) as the module docstring defines it, from jax's Threefry-2x32 one block at a time."""
  lane = lambda tag: int(np.asarray(jax_random.threefry_2x32(
      jax.random.key_data(key), np.array([r // 4, tag], np.uint32))).astype("<u4").view("<u2")[r % 4])
  return (lane(1) << 16) | lane(2)


def test_the_hash_follows_its_definition_on_every_path():
  key = sub_keys(1)[0]
  ids = np.array([7, 3, 2**32 - 1, 0, 8, 9, 1234567], np.uint32)
  spec = [_spec_hash(key, int(r)) for r in ids]
  assert np.asarray(subsample.hash_ids(key, ids)).tolist() == spec
  # Each id's value does not depend on which other ids are hashed, nor on their shape.
  alone = [int(subsample.hash_ids(key, ids[i:i + 1])[0]) for i in range(len(ids))]
  assert alone == spec
  assert np.asarray(subsample.hash_ids(key, ids[:6].reshape(2, 3))).reshape(-1).tolist() == spec[:6]


# Ties (hi equal to the limit's top half) come 1 in 65,536 pairs: 6 * 2**14 queries of 64 ids give
# about 91 of them.
TIE_IDS = 64


@pytest.mark.parametrize("q", [1.0, 0.5, 0.01, 2.0**-16, 2.0**-32])
@pytest.mark.parametrize("ids", [np.arange(TIE_IDS), np.arange(8, 8 + 72), np.arange(3, 3 + 64),
                                 np.array([1, 5, 8, 9, 10, 11, 12, 13, 14, 15, 100, 2**32 - 1])],
                         ids=["dense", "dense from 8", "unaligned", "scattered"])
def test_every_path_decides_h_le_limit(q, ids):
  """membership (dense and general) and candidate_membership (the host scan's kernel is checked
  against membership in test_scan_kernel.py)."""
  ids = ids.astype(np.uint32)
  k = sub_keys(6 * 2**14 if len(ids) == TIE_IDS else 6)
  keep = subsample.limit(q)
  h = np.asarray(jax.vmap(lambda key: subsample.hash_ids(key, ids))(k))
  want = h <= keep
  np.testing.assert_array_equal(np.asarray(subsample.membership(k, ids, keep)), want)
  np.testing.assert_array_equal(
      np.asarray(subsample.candidate_membership(k, np.tile(ids, (len(k), 1)), keep)), want)
  if q == 0.01 and len(ids) == TIE_IDS:  # ~96 ties of the upper halves, decided both ways
    tied = (h >> 16) == (int(keep) >> 16)
    assert (tied & want).any() and (tied & ~want).any()


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
