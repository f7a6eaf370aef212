"""Training neighbours over a public store: exact, the row itself first, cached by fingerprint."""

import numpy as np
import pytest

from dprdm_jax.retrieval import public
from dprdm_jax.retrieval import store as store_lib


def _store(path, n=300, d=16, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return store_lib.EmbeddingStore.write(path, x, ids=np.arange(n) * 3 + 1)


def test_matches_brute_force_with_self_first(tmp_path):
  store = _store(tmp_path / "store")
  found = public.training_neighbors(store, 5)
  x = np.asarray(store.embeddings)
  scores = x @ x.T
  np.fill_diagonal(scores, -np.inf)
  expected = np.argsort(-scores, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(found[:, 0], np.arange(len(store)))
  np.testing.assert_array_equal(found[:, 1:], expected)
  cached = np.load(tmp_path / "neighbors-k5.npz")
  np.testing.assert_array_equal(cached["ids"], store.ids[found])


def test_cache_is_reused_and_keyed_by_fingerprint(tmp_path):
  store = _store(tmp_path / "store")
  first = public.training_neighbors(store, 3)
  np.savez(tmp_path / "neighbors-k3.npz", positions=first[::-1], ids=store.ids[first[::-1]],
           fingerprint=store.fingerprint)
  np.testing.assert_array_equal(public.training_neighbors(store, 3), first[::-1])
  np.savez(tmp_path / "neighbors-k3.npz", positions=first[::-1], ids=store.ids[first[::-1]],
           fingerprint="another dataset")
  np.testing.assert_array_equal(public.training_neighbors(store, 3), first)


def test_bad_k(tmp_path):
  store = _store(tmp_path / "store", n=10)
  with pytest.raises(ValueError, match=r"k must lie in \[1, 10\]"):
    public.training_neighbors(store, 11)
