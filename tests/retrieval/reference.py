"""The explicit reference for private retrieval tests: brute force over a materialised subsample."""

import numpy as np

from dprdm_jax.privacy import keys
from dprdm_jax.retrieval import subsample


def integer_rows(rng, n, d):
  """Small-integer rows: every inner product is exact in float32, and ties are common."""
  return rng.integers(-3, 4, size=(n, d)).astype(np.float32)


def subsample_keys(b, first=0, seed=9):
  return keys.query_keys(seed, first, b, keys.Stream.SUBSAMPLE)


def materialised_top_k(table, ids, queries, member, k):
  """(ids (B, k) int64 with -1 padding, scores (B, k)) from the rows each query keeps, ties to
  the lower id."""
  out_ids = np.full((len(queries), k), -1, np.int64)
  out_scores = np.full((len(queries), k), -np.inf)
  for b, query in enumerate(queries):
    rows = np.flatnonzero(member[b])
    scores = table[rows].astype(np.float64) @ query.astype(np.float64)
    best = np.lexsort((ids[rows], -scores))[:k]
    out_ids[b, :len(best)] = ids[rows][best]
    out_scores[b, :len(best)] = scores[best]
  return out_ids, out_scores


def members(ids, sub_keys, q):
  return np.asarray(subsample.membership(sub_keys, np.asarray(ids, np.uint32), subsample.limit(q)))


def sign_rows(rng, n, d):
  """Unit rows with entries +-1/sqrt(d) (d a power of 4): inner products are exact in float32 in
  every back-end, and ties are common."""
  return (rng.choice([-1.0, 1.0], size=(n, d)) / np.sqrt(d)).astype(np.float32)
