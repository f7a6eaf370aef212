"""Private k-NN on the host: a blocked scan of the subsample's pairs, or exact ScaNN + a filter.

Two exact methods, the same answer:

- "scan" (the default at small rates): one pass over the table in blocks of rows. For each block,
  the keyed-hash membership (`subsample`) of every (record, query) pair is computed in one fused
  XLA call, record-major, and only the sampled pairs are scored, each as one float32 dot product
  of the record's row and the query. A record is read from memory once per batch and scored for
  the ~q*B queries that sampled it; the work is B*N hashes and q*N*B*d multiply-adds, against
  N*B*d for scoring every record. The pairs are then grouped by query (record order kept) and the
  first k of each query in (score, lower id) order are the answer.
- "scann": an exact (brute-force) ScaNN search returns the C best records of the whole store, C
  about k/q with a margin; the membership keeps those in the query's subsample, and the first k in
  (score, lower id) order are the answer. When fewer than k candidates survive and the C-th
  candidate does not already rule out better records, C grows fourfold and the query is searched
  again, until k are found or C covers the store. Scoring every record pays off at large rates.

"auto" picks "scan" for rates up to SCAN_MAX_RATE, "scann" above.

Formal guarantee (rule R1), both methods: the result equals the exact top k of the subsample, ties
to the lower id, the same as `device.private_knn` for the same keys. "scan" computes a score only
for a sampled (record, query) pair, so a record outside the subsample enters no computation of the
query's answer. "scann" answers a query only when every record outside the candidates scores
strictly below the k-th member found (or no record is left out), so no record that was not sampled
can displace one that was. Only an exact index is accepted: with an approximate one a non-sampled
record could push a sampled one out of the candidates, and an index trained on private data is
itself a release of private data.
"""

import concurrent.futures
import math
import os

import numpy as np

from dprdm_jax import errors
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample

METHODS = ("auto", "scan", "scann")
# "auto" scans at sampling rates up to this, and searches with ScaNN above it (see `retrieve`).
SCAN_MAX_RATE = 0.05
# Records hashed per membership call in the scan: a (BLOCK_ROWS, B) bool block of a few MB.
BLOCK_ROWS = 16384
# Sampled pairs scored per gather-and-dot step: their rows and queries (2 * 256 * d floats) stay in
# the core's cache between the gather and the dot products.
PAIR_CHUNK = 256


class PrivateRetrievalError(errors.InputError):
  """Private retrieval was asked of something that cannot guarantee rule R1."""


def _score_pairs(embeddings, queries, record, query, out):
  """out[i] = <embeddings[record[i]], queries[query[i]]> in float32, PAIR_CHUNK pairs at a time.

  The buffers are allocated once per call, and `take` writes into them with mode "clip" (the
  positions are valid; mode "raise" copies `out` first): a fresh 256-row array per chunk made the
  loop several times slower when run in the main thread (page faults on each new buffer).
  """
  rows = np.empty((PAIR_CHUNK, queries.shape[1]), np.float32)
  cols = np.empty((PAIR_CHUNK, queries.shape[1]), np.float32)
  same_dtype = embeddings.dtype == np.float32
  for lo in range(0, len(record), PAIR_CHUNK):
    hi = min(lo + PAIR_CHUNK, len(record))
    x, y = rows[:hi - lo], cols[:hi - lo]
    if same_dtype:
      np.take(embeddings, record[lo:hi], axis=0, out=x, mode="clip")
    else:
      x[...] = embeddings[record[lo:hi]]
    np.take(queries, query[lo:hi], axis=0, out=y, mode="clip")
    np.vecdot(x, y, out=out[lo:hi])


def _descending_keys(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """uint64 keys whose ascending order is descending score, then ascending position (< 2**32).

  The high word maps float32 to uint32 monotonically (after -0.0 -> +0.0, so that equal scores
  get equal words), inverted; the low word is the position, so keys are distinct and ties go to
  the lower position. `_decode_scores` inverts the high word.
  """
  bits = (scores + np.float32(0.0)).view(np.uint32)
  ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))
  return ((~ascending).astype(np.uint64) << np.uint64(32)) | positions.astype(np.uint64)


def _decode_scores(keys: np.ndarray) -> np.ndarray:
  ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
  bits = np.where(ascending >> 31, ascending & np.uint32((1 << 31) - 1), ~ascending)
  return bits.view(np.float32)


_POOL = None
# Scoring threads (0: score in the calling thread).
_WORKERS = os.cpu_count() or 1


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """Worker threads for scoring (numpy releases the GIL in take and vecdot), one per core."""
  global _POOL
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS,
                                                  thread_name_prefix="dprdm-scan")
  return _POOL


def scan_top_k(embeddings: np.ndarray, ids: np.ndarray, queries: np.ndarray, subsample_keys,
               sampling_rate: float, k: int,
               block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
  """The top k of each query's Poisson subsample by a blocked scan: (positions, scores), (B, k).

  Args:
    embeddings: (N, d) rows (float32, or a dtype numpy casts to it, e.g. bfloat16; a memory map
      is fine), row i being record ids[i].
    ids: (N,) record ids, unique, ascending, in [0, 2**32).
    queries: (B, d) finite float32 queries.
    subsample_keys: (B,) keys from `keys.query_keys(..., Stream.SUBSAMPLE)`.
    sampling_rate: q.
    k: neighbours per query.
    block_rows: records hashed per membership call (a multiple of 1024 keeps compilations few).

  Returns:
    positions: (B, k) int64 rows of `embeddings`, best first, 0 in invalid slots.
    scores: (B, k) float32, best first, -inf in invalid slots (the subsample had fewer than k).

  Formal guarantee (R1): a score is computed only for a (record, query) pair whose membership is
  true, and the answer is the exact top k of those scores with ties to the lower position (the
  lower id): a function of the query, its key and the records of its subsample alone. Time and
  memory grow with the subsample sizes (O(q*N*B) pairs held at once).
  """
  n, b = len(ids), len(queries)
  queries = np.ascontiguousarray(queries, np.float32)
  keep = subsample.limit(sampling_rate)
  ids32 = np.asarray(ids).astype(np.uint32)
  block = max(1, min(block_rows, -(-n // 1024) * 1024))

  def hash_block(start):
    part = ids32[start:start + block]
    if len(part) < block:  # a fixed shape: one compilation; the padding ids are cut off below
      part = np.concatenate([part, np.zeros(block - len(part), np.uint32)])
    return subsample.record_membership(subsample_keys, part, keep)

  records, queries_of, scores, jobs = [], [], [], []
  pending = hash_block(0) if n else None
  for start in range(0, n, block):
    member = np.asarray(pending)[:min(block, n - start)]
    if start + block < n:
      pending = hash_block(start + block)
    flat = np.flatnonzero(member)  # pairs in record order, then query order
    record, query = np.divmod(flat, b)
    record += start
    out = np.empty(len(flat), np.float32)
    if _WORKERS == 0:
      _score_pairs(embeddings, queries, record, query, out)
    else:  # one job per worker, so that a table of one block also uses every core
      cuts = np.linspace(0, len(flat), _WORKERS + 1).astype(int)
      for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi > lo:
          jobs.append(_pool().submit(_score_pairs, embeddings, queries, record[lo:hi],
                                     query[lo:hi], out[lo:hi]))
    records.append(record)
    queries_of.append(query)
    scores.append(out)
  for job in jobs:
    job.result()
  record = np.concatenate(records) if records else np.zeros(0, np.int64)
  query = np.concatenate(queries_of) if queries_of else np.zeros(0, np.int64)
  keys = _descending_keys(np.concatenate(scores) if scores else np.zeros(0, np.float32), record)
  # Group the pairs by query (a stable radix sort on 16-bit query numbers), then keep each query's
  # k smallest keys: its k best scores, ties to the lower position.
  order = np.argsort(query.astype(np.uint16) if b <= 2**16 else query, kind="stable")
  keys = keys[order]
  ends = np.cumsum(np.bincount(query, minlength=b))
  best_positions = np.zeros((b, k), np.int64)
  best_scores = np.full((b, k), -np.inf, np.float32)
  for i in range(b):
    own = keys[ends[i - 1] if i else 0:ends[i]]
    if len(own) > k:
      own = np.partition(own, k - 1)[:k]
    own = np.sort(own)
    best_positions[i, :len(own)] = own & np.uint64(0xFFFFFFFF)
    best_scores[i, :len(own)] = _decode_scores(own)
  return best_positions, best_scores


class HostRetriever:
  """Exact private k-NN over an embedding store: a blocked scan, or a brute-force ScaNN index."""

  def __init__(self, store: store_lib.EmbeddingStore, index: index_lib.ScannIndex,
               margin: float = 2.0, method: str = "auto"):
    """Pairs a store with its exact index; PrivateRetrievalError for an approximate index.

    margin: for "scann", candidates per query are about margin * k / q, so that the first search
      usually finds k members (a Binomial(C, q) count with mean margin * k).
    method: "scan", "scann", or "auto" (by the sampling rate; see the module docstring).
    """
    if method not in METHODS:
      raise errors.InputError(f"method must be one of {METHODS}, got {method!r}")
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
    self._method = method

  def retrieve(self, queries: np.ndarray, subsample_keys, sampling_rate: float,
               k: int) -> device.Neighbors:
    """The top-k of each query's Poisson subsample, as numpy arrays in `device.Neighbors`.

    Args:
      queries: (B, d) finite float32 query embeddings.
      subsample_keys: (B,) keys from `keys.query_keys(..., Stream.SUBSAMPLE)`.
      sampling_rate: q.
      k: neighbours per query.

    Raises:
      ValueError: for queries of the wrong shape or with non-finite values.

    Guarantee: R1, as in the module docstring.
    """
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self._index.dim:
      raise errors.InputError(f"queries must have shape (B, {self._index.dim}), got "
                              f"{queries.shape}")
    if not np.isfinite(queries).all():
      raise errors.InputError("queries hold non-finite values")
    subsample.limit(sampling_rate)  # refuses a bad rate before any work
    method = self._method
    if method == "auto":
      method = "scan" if sampling_rate <= SCAN_MAX_RATE else "scann"
    if method == "scan":
      positions, scores = scan_top_k(self._embeddings, self._ids, queries, subsample_keys,
                                     sampling_rate, k)
      valid = scores > -np.inf
      embeddings = np.asarray(self._embeddings[positions.ravel()], np.float32).reshape(
          positions.shape + (queries.shape[1],))
      return device.Neighbors(np.where(valid[..., None], embeddings, 0.0),
                              np.where(valid, self._ids[positions], 0).astype(np.uint32), valid,
                              scores)
    return self._retrieve_scann(queries, subsample_keys, sampling_rate, k)

  def _retrieve_scann(self, queries, subsample_keys, sampling_rate, k) -> device.Neighbors:
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
