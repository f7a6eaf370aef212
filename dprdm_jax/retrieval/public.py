"""Training neighbours: the k nearest public records of every public training image.

The paper trains the U-Net on public data conditioned on each image's k = 4 nearest public
neighbours (itself included). They are computed once per embedding store with the ScaNN index
(exact below the index's brute-force threshold, tree + AH above it: public data needs no exact
search) and cached beside the store as neighbors-k{K}.npz (row positions and ids). Nothing here
touches private data or the privacy budget.
"""

import os
import pathlib

import ml_collections
import numpy as np

from dprdm_jax import errors
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import store as store_lib


def training_neighbors(store: store_lib.EmbeddingStore, k: int,
                       index_settings: ml_collections.ConfigDict = None) -> np.ndarray:
  """(N, k) row positions into `store` of each row's k nearest rows, the row itself first.

  Cached in the store's parent directory; the cache is keyed by k and the store's fingerprint.
  """
  if not 1 <= k <= len(store):
    raise errors.InputError(f"k must lie in [1, {len(store)}], got {k}")
  cache = pathlib.Path(store.directory).parent / f"neighbors-k{k}.npz"
  if cache.exists():
    cached = np.load(cache)
    if str(cached["fingerprint"]) == store.fingerprint:
      return cached["positions"]
  embeddings = np.asarray(store.embeddings, np.float32)
  settings = index_settings or index_lib.index_config(len(store))
  index = index_lib.ScannIndex.build(embeddings, store.ids, settings)
  found, _ = index.search(embeddings, k)
  positions = np.searchsorted(store.ids, found)
  if (found < 0).any() or not np.array_equal(store.ids[positions], found):
    raise errors.InputError("the index returned fewer than k neighbours for some rows")
  # The row itself first: an approximate search or a tie may list it later, or not at all.
  own = np.arange(len(store))[:, None]
  others = np.where(positions == own, -1, positions)
  ordered = np.concatenate([own, others], axis=1)
  result = np.stack([row[row >= 0][:k] for row in ordered])
  tmp = cache.with_suffix(".tmp.npz")
  np.savez(tmp, positions=result, ids=store.ids[result], fingerprint=store.fingerprint)
  os.replace(tmp, cache)
  return result
