"""The host scan's kernel: its Threefry is jax's, and it keeps exactly the subsample's top k."""

import jax
from jax.extend import random as jax_random
import numpy as np
import pytest

from dprdm_jax.retrieval import host
from dprdm_jax.retrieval import scan_kernel
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample
from tests.retrieval import reference as ref


def _ours(key, counters, tag):
  out0, out1 = np.empty(len(counters), np.uint32), np.empty(len(counters), np.uint32)
  scan_kernel.threefry_blocks(key[0], key[1], np.asarray(counters, np.uint32), tag, out0, out1)
  return out0, out1


def test_threefry_is_random123s_and_jaxs():
  # Random123's known-answer vectors for Threefry-2x32-20: (key, counter) -> output.
  for key, counter, want in [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
                              (0x1CB996FC, 0xBB002BE7)),
                             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3),
                              (0xC4923A9C, 0x483DF7A0))]:
    out = _ours(np.array(key, np.uint32), [counter[0]], counter[1])
    assert (int(out[0][0]), int(out[1][0])) == want
  rng = np.random.default_rng(0)
  for _ in range(4):  # a million blocks, word for word against jax's
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    counters = rng.integers(0, 2**32, 250_000, dtype=np.uint32)
    tag = int(rng.integers(0, 2**32))
    words = np.asarray(jax_random.threefry_2x32(
        key, np.concatenate([counters, np.full_like(counters, tag)])))
    out0, out1 = _ours(key, counters, tag)
    np.testing.assert_array_equal(out0, words[:len(counters)])
    np.testing.assert_array_equal(out1, words[len(counters):])


@pytest.mark.parametrize("ids", ["dense", "scattered"])
def test_ties_of_the_upper_half_are_decided_by_the_lower_one(ids):
  """2048 queries x 160 records give about 5 pairs whose hi equals the limit's top half; with k
  as large as the table, the kernel must return exactly each query's subsample."""
  rng = np.random.default_rng(1)
  n, b, q = 160, 2048, 0.3
  ids = np.arange(n) if ids == "dense" else np.sort(rng.choice(2**32, n, replace=False))
  rows = ref.sign_rows(rng, n, 4)
  queries = ref.sign_rows(rng, b, 4)
  keys = ref.subsample_keys(b, seed=77)
  keep = subsample.limit(q)
  h = np.asarray(jax.vmap(lambda key: subsample.hash_ids(key, ids.astype(np.uint32)))(keys))
  tied = (h >> 16) == (int(keep) >> 16)
  kept_ties = tied & (h <= keep)
  assert kept_ties.any() and (tied & ~kept_ties).any()  # both outcomes occur
  positions, scores = host.scan_top_k(rows, ids, queries, keys, q, n)
  found = np.zeros((b, n), bool)
  for i in range(b):
    found[i, positions[i][scores[i] > -np.inf]] = True
  np.testing.assert_array_equal(found, h <= keep)


def test_a_sharded_store_is_scanned_in_place_like_one_array(tmp_path):
  rng = np.random.default_rng(2)
  n, d = 3000, 16
  rows = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.sort(rng.choice(10**6, n, replace=False))
  store = store_lib.EmbeddingStore.write(tmp_path / "s", rows, ids, shard_rows=700)
  assert len(store.shards) == 5
  queries = rng.normal(size=(9, d)).astype(np.float32)
  keys = ref.subsample_keys(9)
  found = host.HostRetriever(store).retrieve(queries, keys, 0.05, 12)
  positions, scores = host.scan_top_k(np.asarray(store.embeddings), store.ids, queries, keys,
                                      0.05, 12)
  valid = scores > -np.inf
  np.testing.assert_array_equal(found.valid, valid)
  np.testing.assert_array_equal(found.ids, np.where(valid, store.ids[positions], 0))
  np.testing.assert_array_equal(found.scores, scores)
  np.testing.assert_array_equal(
      found.embeddings, np.where(valid[..., None], np.asarray(store.embeddings)[positions], 0))
