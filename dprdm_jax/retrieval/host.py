"""Private k-NN on the host: a scan of the store in a compiled kernel, or exact ScaNN + a filter.

Two exact methods, the same answer:

- "scan" (the default at small rates): one pass over the table's rows, where they are (memory
  maps are read in place), in jobs of rows on one thread per core (the calling thread and pool
  threads). Each job is one call of `scan_kernel.scan_block`, which hashes each query's
  subsample over the job's ids (`subsample`: one Threefry block per 4 records) and scores a row,
  one float32 dot product, only for a query that sampled it, keeping each query's k best. The
  work is B*N/4 hashes and q*N*B*d multiply-adds, against N*B*d for scoring every record, and
  the memory beside the rows is the jobs' k best per query; the jobs' lists are merged at the
  end (score down, then lower id).
- "scann": an exact (brute-force) ScaNN search returns the C best records of the whole store, C
  about k/q with a margin; the membership keeps those in the query's subsample, and the first k in
  (score, lower id) order are the answer. When fewer than k candidates survive and the C-th
  candidate does not already rule out better records, C grows fourfold and the query is searched
  again, until k are found or C covers the store. Scoring every record pays off at large rates.

"auto" picks "scann" above SCAN_MAX_RATE when the retriever has an exact index, "scan" otherwise.

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
import itertools
import math
import os
from typing import Optional

import jax
import numpy as np

from dprdm_jax import errors
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import scan_kernel
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample

METHODS = ("auto", "scan", "scann")
# "auto" scans at sampling rates up to this, and searches with ScaNN above it (see `retrieve`).
SCAN_MAX_RATE = 0.05
# Most rows per scan job: each job is one `scan_kernel.scan_block` call with its own k best per
# query. A table is cut into up to 4 jobs per worker (a multiple of 4 rows each, so that runs of
# 4 ids stay together), which keeps the workers evenly loaded, but into fewer where a job would
# hold under MIN_JOB_TILES tiles: there the per-job costs (its best lists, more lists to merge, a
# partial last tile) outweigh the balance (at N = 10^4, d = 512 on 2 cores, 2 jobs of 5,000 rows
# scan in 15-25% less time than 8 of 1,250).
JOB_ROWS = 1 << 15
MIN_JOB_TILES = 8


class PrivateRetrievalError(errors.InputError):
  """Private retrieval was asked of something that cannot guarantee rule R1."""


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
# Scan threads, the calling thread included (1: the calling thread alone).
_WORKERS = os.cpu_count() or 1


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """The scan's helper threads (its kernel releases the GIL): one per core but the caller's."""
  global _POOL
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, _WORKERS - 1),
                                                  thread_name_prefix="dprdm-scan")
  return _POOL


def _run_jobs(job, parts: list) -> list:
  """[job(*part) for part in parts], on the calling thread and _WORKERS - 1 pool threads.

  Each thread takes the next part whenever it is free. The calling thread starts at once rather
  than wait for pool threads that have been idle, which on a VM can take milliseconds to run
  again: at N = 10^4, d = 512, B = 256 on 2 cores, a pass that takes 2.7 ms back to back took
  6.0-6.4 ms after the caller paused 1-50 ms when two pool threads did the jobs, and 3.0-3.7 ms
  with the caller taking part (after a 50 ms sleep, 5.6 ms either way).
  """
  results = [None] * len(parts)
  order = itertools.count()  # next() on a count is atomic under the GIL
  failed = []  # once a job fails, the threads take no further parts

  def drain():
    while not failed and (i := next(order)) < len(parts):
      try:
        results[i] = job(*parts[i])
      except BaseException:
        failed.append(i)
        raise

  helpers = [_pool().submit(drain) for _ in range(min(_WORKERS, len(parts)) - 1)]
  try:
    drain()
  finally:
    # Every helper is done before the caller returns or raises: no job outlives the call.
    concurrent.futures.wait(helpers)
  for helper in helpers:
    helper.result()
  return results


_EMPTY = np.iinfo(np.int64).max  # the position of an empty slot in a best list


def scan_top_k(embeddings, ids, queries: np.ndarray, subsample_keys, sampling_rate: float,
               k: int, job_rows: Optional[int] = None,
               tile_rows: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """The top k of each query's Poisson subsample by a scan: (positions, scores), (B, k).

  Args:
    embeddings: (N, d) rows (float32, or a dtype numpy casts to it, e.g. bfloat16; a memory map
      is fine), row i being record ids[i]; or a list of such arrays (a store's shards), read in
      place and numbered in order.
    ids: (N,) record ids, unique, ascending, in [0, 2**32); or a list, one per shard.
    queries: (B, d) finite float32 queries.
    subsample_keys: (B,) keys from `keys.query_keys(..., Stream.SUBSAMPLE)`.
    sampling_rate: q.
    k: neighbours per query.
    job_rows: rows per kernel call (the unit of work of a scan thread); by default JOB_ROWS or
      fewer, so that every worker gets 1 to 4 jobs of at least MIN_JOB_TILES tiles where the
      table allows.
    tile_rows: rows the kernel checks every query against at a time (a multiple of 4; by
      default about `scan_kernel.TILE_BYTES` of rows).

  Returns:
    positions: (B, k) int64 rows of the table (shards numbered in order), best first, 0 in
      invalid slots.
    scores: (B, k) float32, best first, -inf in invalid slots (the subsample had fewer than k).

  Formal guarantee (R1): a score is computed only for a (record, query) pair whose membership is
  true, and the answer is the exact top k of those scores with ties to the lower position (the
  lower id): a function of the query, its key and the records of its subsample alone
  (`scan_kernel`). Memory: O(B*k) per job beside the rows, at any N; a bfloat16 job's rows are
  converted to float32 one job at a time.
  """
  shards = list(zip(ids, embeddings)) if isinstance(embeddings, (list, tuple)) else [
      (ids, embeddings)]
  # Plain views of memory maps: slicing an np.memmap costs a Python-level finaliser per slice.
  shards = [(np.asarray(shard_ids), np.asarray(rows)) for shard_ids, rows in shards]
  queries = np.ascontiguousarray(queries, np.float32)
  b, dim = queries.shape
  keep = subsample.limit(sampling_rate)
  key_words = np.ascontiguousarray(jax.random.key_data(subsample_keys), np.uint32)
  tile = scan_kernel.tile_rows(dim) if tile_rows is None else tile_rows
  if job_rows is None:
    total, workers = sum(len(shard_ids) for shard_ids, _ in shards), max(1, _WORKERS)
    per_worker = max(1, min(4, total // (workers * MIN_JOB_TILES * tile)))
    share = -(-total // (per_worker * workers))  # rows per job
    job_rows = min(JOB_ROWS, max(tile, -(-share // 4) * 4))

  def job(rows, part_ids, first_position):
    scores = np.full((b, k), -np.inf, np.float32)
    positions = np.full((b, k), _EMPTY, np.int64)
    scan_kernel.scan_block(key_words, queries, np.ascontiguousarray(rows, np.float32),
                           np.ascontiguousarray(part_ids, np.uint32), first_position, keep, tile,
                           scores, positions)
    return scores, positions

  parts, offset = [], 0
  for shard_ids, rows in shards:
    for start in range(0, len(shard_ids), job_rows):
      parts.append((rows[start:start + job_rows], shard_ids[start:start + job_rows],
                    offset + start))
    offset += len(shard_ids)
  results = _run_jobs(job, parts)
  if not results:
    return np.zeros((b, k), np.int64), np.full((b, k), -np.inf, np.float32)
  scores = np.concatenate([r[0] for r in results], axis=1)
  positions = np.concatenate([r[1] for r in results], axis=1)
  # Merge the jobs' lists: the k best of each row by (score down, position up).
  empty = positions == _EMPTY
  keys = np.where(empty, np.iinfo(np.uint64).max,
                  _descending_keys(scores, np.where(empty, 0, positions)))
  best = np.sort(keys, axis=1)[:, :k]
  valid = best != np.iinfo(np.uint64).max
  best_positions = np.where(valid, best & np.uint64(0xFFFFFFFF), 0).astype(np.int64)
  best_scores = np.where(valid, _decode_scores(best), -np.inf).astype(np.float32)
  return best_positions, best_scores


class HostRetriever:
  """Exact private k-NN over an embedding store: a scan, or a brute-force ScaNN index."""

  def __init__(self, store: store_lib.EmbeddingStore,
               index: Optional[index_lib.ScannIndex] = None, margin: float = 2.0,
               method: str = "auto", values: Optional[store_lib.EmbeddingStore] = None):
    """A retriever over `store`; PrivateRetrievalError for an approximate index.

    index: an exact ScaNN index of the same store, for "scann" only. The scan reads the store's
      rows where they are (a memory map), so without an index the retriever holds no copy of
      the table: about 1x its size in memory at any N.
    margin: for "scann", candidates per query are about margin * k / q, so that the first search
      usually finds k members (a Binomial(C, q) count with mean margin * k).
    method: "scan", "scann" (needs the index), or "auto": "scann" above SCAN_MAX_RATE when there
      is an index, "scan" otherwise (see the module docstring).
    values: a store of the same records (the same ids) whose rows the neighbours' `embeddings`
      are read from, as a DeviceTable's values: e.g. image embeddings retrieved by caption keys.
      By default the neighbours' own rows of `store`.
    """
    if method not in METHODS:
      raise errors.InputError(f"method must be one of {METHODS}, got {method!r}")
    self._ids = store.ids
    if index is not None:
      if not index.is_exact:
        raise PrivateRetrievalError(
            "private retrieval needs an exact (brute-force) index: with an approximate index, "
            "records outside the subsample can displace sampled ones (rule R1), and a tree or "
            "quantiser trained on the private embeddings is itself a release of them; build the "
            "index with mode 'exact'")
      if not np.array_equal(index.ids, self._ids):
        raise PrivateRetrievalError("the index was not built from this store (record ids differ)")
    elif method == "scann":
      raise errors.InputError("method 'scann' needs an exact ScaNN index of the store")
    if values is not None and not np.array_equal(values.ids, self._ids):
      raise errors.InputError("the values store holds other records than the store (record ids "
                              "differ)")
    self._store = store
    self._values = store if values is None else values
    self._dim = store.dim
    self._index = index
    self._margin = margin
    self._method = method

  def retrieve(self, queries: np.ndarray, subsample_keys, sampling_rate: float,
               k: int) -> device.Neighbors:
    """The top-k of each query's Poisson subsample, as numpy arrays in `device.Neighbors`
    (embeddings from the values store when there is one).

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
    if queries.ndim != 2 or queries.shape[1] != self._dim:
      raise errors.InputError(f"queries must have shape (B, {self._dim}), got "
                              f"{queries.shape}")
    if not np.isfinite(queries).all():
      raise errors.InputError("queries hold non-finite values")
    subsample.limit(sampling_rate)  # refuses a bad rate before any work
    method = self._method
    if method == "auto":
      method = "scann" if sampling_rate > SCAN_MAX_RATE and self._index is not None else "scan"
    if method == "scan":
      shards = self._store.shards
      positions, scores = scan_top_k([rows for _, rows in shards], [ids for ids, _ in shards],
                                     queries, subsample_keys, sampling_rate, k)
      valid = scores > -np.inf
      embeddings = self._values.take(positions.ravel()).reshape(
          positions.shape + (self._values.dim,))
      embeddings[~valid] = 0.0
      return device.Neighbors(embeddings,
                              np.where(valid, self._ids[positions], 0).astype(np.uint32), valid,
                              scores)
    return self._retrieve_scann(queries, subsample_keys, sampling_rate, k)

  def _retrieve_scann(self, queries, subsample_keys, sampling_rate, k) -> device.Neighbors:
    b, n = len(queries), len(self._ids)
    keep = subsample.limit(sampling_rate)
    out = device.Neighbors(np.zeros((b, k, self._values.dim), np.float32),
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
    out.embeddings[query, :j] = self._values.take(np.searchsorted(self._ids, ids))
