"""Private k-NN on the host: exact ScaNN search with over-retrieval, then the subsample filter.

For each query, an exact (brute-force) ScaNN search returns the C best records of the whole store,
C about k/q with a margin; the keyed-hash membership (`subsample`) keeps those in the query's
subsample, and the first k in (score, lower id) order are the answer. When fewer than k candidates
survive and the C-th candidate does not already rule out better records, C grows fourfold and the
query is searched again, until k are found or C covers the store.

Formal guarantee (rule R1): the result equals the exact top k of the subsample, ties to the lower
id, the same as `device.private_knn` for the same keys. A query is answered only when every record
outside the candidates scores strictly below the k-th member found (or no record is left out), so
no record that was not sampled can displace one that was. Only an exact index is accepted: with an
approximate one a non-sampled record could push a sampled one out of the candidates, and an index
trained on private data is itself a release of private data.
"""

import math

import numpy as np

from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample


class PrivateRetrievalError(ValueError):
  """Private retrieval was asked of something that cannot guarantee rule R1."""


class HostRetriever:
  """Exact private k-NN over an embedding store with a brute-force ScaNN index."""

  def __init__(self, store: store_lib.EmbeddingStore, index: index_lib.ScannIndex,
               margin: float = 2.0):
    """Pairs a store with its exact index; PrivateRetrievalError for an approximate index.

    margin: candidates per query are about margin * k / q, so that the first search usually finds
      k members (a Binomial(C, q) count with mean margin * k).
    """
    if not index.is_exact:
      raise PrivateRetrievalError(
          "private retrieval needs an exact (brute-force) index: with an approximate index, "
          "records outside the subsample can displace sampled ones (rule R1), and a tree or "
          "quantiser trained on the private embeddings is itself a release of them; build the "
          "index with mode 'exact'")
    self._ids = store.ids
    if not np.array_equal(index.ids, self._ids):
      raise PrivateRetrievalError("the index was not built from this store (record ids differ)")
    self._embeddings = store.embeddings
    self._index = index
    self._margin = margin

  def retrieve(self, queries: np.ndarray, subsample_keys, sampling_rate: float,
               k: int) -> device.Neighbors:
    """The top-k of each query's Poisson subsample, as numpy arrays in `device.Neighbors`.

    Args:
      queries: (B, d) float32 query embeddings.
      subsample_keys: (B,) keys from `keys.query_keys(..., Stream.SUBSAMPLE)`.
      sampling_rate: q.
      k: neighbours per query.

    Guarantee: R1, as in the module docstring.
    """
    queries = np.asarray(queries, np.float32)
    b, n = len(queries), len(self._ids)
    keep = subsample.limit(sampling_rate)
    out = device.Neighbors(np.zeros((b, k, queries.shape[1]), np.float32),
                           np.zeros((b, k), np.uint32), np.zeros((b, k), bool),
                           np.full((b, k), -np.inf, np.float32))
    pending = np.arange(b)
    count = min(n, math.ceil(self._margin * k / sampling_rate) + k)
    while len(pending):
      ids, scores = self._index.search(queries[pending], count)
      present = ids >= 0
      member = np.asarray(subsample.candidate_membership(
          subsample_keys[pending], np.where(present, ids, 0).astype(np.uint32), keep)) & present
      done = []
      for row, query in enumerate(pending):
        m = np.flatnonzero(member[row])
        order = m[np.lexsort((ids[row, m], -scores[row, m]))][:k]
        last = scores[row, present[row]].min(initial=np.inf)
        settled = len(order) == k and scores[row, order[-1]] > last
        if count >= n or settled:
          self._fill(out, query, ids[row, order], scores[row, order])
          done.append(row)
      pending = np.delete(pending, done)
      count = min(n, count * 4)
    return out

  def _fill(self, out: device.Neighbors, query: int, ids: np.ndarray, scores: np.ndarray):
    j = len(ids)
    out.ids[query, :j] = ids
    out.valid[query, :j] = True
    out.scores[query, :j] = scores
    out.embeddings[query, :j] = self._embeddings[np.searchsorted(self._ids, ids)]
