"""The host scan's compiled kernel (numba): subsample membership and scoring in one pass.

`scan_block` walks a block of table rows once per batch of queries, in tiles of rows that stay in
the core's cache: for each query it hashes the tile's ids (the subsample's hi halves, one
Threefry block per 4 dense ids), and scores a row only when the query's subsample holds it,
keeping each query's k best (score, position) pairs. Nothing is materialised per (query, record)
pair, so memory stays O(B*k) at any N.

Why a kernel of our own, and why numba. jax's Threefry runs in XLA, where a scan could only
return the membership bits for the host to read back and act on: reading them, listing the
sampled pairs and gathering their rows cost more than the hashing (benchmarks/README.md).
numba (a well-kept LLVM JIT for numpy code) compiles the whole loop with the hash vectorised, at
0.9 ns a Threefry block on one core against 3.4 for XLA's here. `threefry2x32` below is
Random123's Threefry-2x32 with 20 rounds, the function jax.random implements; the tests check it
against jax's own, word for word, on Random123's known-answer vector and on a million random
blocks, and `scan_block` against `subsample.membership` on every path (dense and scattered ids,
ties, every rate).

Formal guarantee (R1, with `subsample`): a row's score is computed only for a query whose
subsample holds it (h(t, r) <= limit(q), h as in `subsample`), and the k best kept are the exact
top k of the subsample's scores, ties to the lower position; a row outside the subsample enters
no computation of that query's answer.
"""

import numba
import numpy as np

from dprdm_jax.retrieval import subsample

# The definition of h(t, r), subsample's (numba freezes module globals as constants).
_HI_TAG, _LO_TAG, _LANES = subsample.HI_TAG, subsample.LO_TAG, subsample.LANES
_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant
# Rows per tile: about this many bytes of float32 rows stay in the core's cache while every
# query of the batch is checked against them.
TILE_BYTES = 1 << 20


@numba.njit(inline="always")
def _rotl(x, r):
  return np.uint32((x << np.uint32(r)) | (x >> np.uint32(32 - r)))


@numba.njit(inline="always")
def _rounds(x0, x1, r0, r1, r2, r3):
  """Four Threefry-2x32 rounds (mix: add, rotate, xor)."""
  x0 = np.uint32(x0 + x1)
  x1 = np.uint32(_rotl(x1, r0) ^ x0)
  x0 = np.uint32(x0 + x1)
  x1 = np.uint32(_rotl(x1, r1) ^ x0)
  x0 = np.uint32(x0 + x1)
  x1 = np.uint32(_rotl(x1, r2) ^ x0)
  x0 = np.uint32(x0 + x1)
  x1 = np.uint32(_rotl(x1, r3) ^ x0)
  return x0, x1


@numba.njit(inline="always")
def threefry2x32(k0, k1, c0, c1):
  """Threefry-2x32-20 of the counter (c0, c1) under the key (k0, k1): two uint32 words."""
  k2 = np.uint32(k0 ^ k1 ^ np.uint32(_PARITY))
  x0 = np.uint32(c0 + k0)
  x1 = np.uint32(c1 + k1)
  x0, x1 = _rounds(x0, x1, 13, 15, 26, 6)
  x0, x1 = np.uint32(x0 + k1), np.uint32(x1 + k2 + np.uint32(1))
  x0, x1 = _rounds(x0, x1, 17, 29, 16, 24)
  x0, x1 = np.uint32(x0 + k2), np.uint32(x1 + k0 + np.uint32(2))
  x0, x1 = _rounds(x0, x1, 13, 15, 26, 6)
  x0, x1 = np.uint32(x0 + k0), np.uint32(x1 + k1 + np.uint32(3))
  x0, x1 = _rounds(x0, x1, 17, 29, 16, 24)
  x0, x1 = np.uint32(x0 + k1), np.uint32(x1 + k2 + np.uint32(4))
  x0, x1 = _rounds(x0, x1, 13, 15, 26, 6)
  return np.uint32(x0 + k2), np.uint32(x1 + k0 + np.uint32(5))


@numba.njit(nogil=True, cache=True)
def threefry_blocks(k0, k1, counters, tag, out0, out1):
  """out0[i], out1[i] = Threefry-2x32-20 of (counters[i], tag) under (k0, k1) (vectorised)."""
  k0, k1, tag = np.uint32(k0), np.uint32(k1), np.uint32(tag)
  for i in range(counters.shape[0]):
    out0[i], out1[i] = threefry2x32(k0, k1, np.uint32(counters[i]), tag)


@numba.njit(inline="always")
def _lane(w0, w1, lane):
  """16-bit lane 0-3 of a block: word 0's low and high half, then word 1's."""
  word = w0 if lane < 2 else w1
  return np.uint32((word >> np.uint32(16 * (lane & 1))) & np.uint32(0xFFFF))


@numba.njit(inline="always")
def _insert(scores, positions, b, score, position):
  """Puts (score, position) into query b's best list (sorted: score down, then position up) if
  it beats the last entry; the last entry drops out."""
  k = scores.shape[1]
  last = k - 1
  if score < scores[b, last] or (score == scores[b, last] and position > positions[b, last]):
    return
  j = last
  while j > 0 and (score > scores[b, j - 1] or
                   (score == scores[b, j - 1] and position < positions[b, j - 1])):
    scores[b, j] = scores[b, j - 1]
    positions[b, j] = positions[b, j - 1]
    j -= 1
  scores[b, j] = score
  positions[b, j] = position


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def scan_block(key_words, queries, rows, ids, first_position, keep, tile, scores, positions):
  """Adds the sampled rows of one block to every query's k best.

  Args:
    key_words: (B, 2) uint32, each query's subsample key (`jax.random.key_data`).
    queries: (B, d) float32.
    rows: (R, d) float32, the block's rows, C-contiguous.
    ids: (R,) uint32, their record ids (ascending).
    first_position: the table position of rows[0].
    keep: uint32, `subsample.limit(q)`.
    tile: rows per tile (a multiple of 4).
    scores, positions: (B, k) float32 and int64, each query's best so far, best first (-inf and
      the largest int64 where empty); updated in place.

  A run of 4 ids from a multiple of 4 shares one Threefry block for its hi halves; other ids
  hash on their own. Scores are float32 dot products (summed in any order: within 1e-6 of the
  device path's for unit vectors; exact for the tests' small-integer rows).
  """
  top = np.uint32(keep >> np.uint32(16))
  low = np.uint32(keep & np.uint32(0xFFFF))
  n, d = rows.shape
  w0 = np.empty(tile, np.uint32)
  w1 = np.empty(tile, np.uint32)
  counters = np.empty(tile, np.uint32)
  hit = np.empty(tile, np.bool_)
  for t0 in range(0, n, tile):
    t1 = min(t0 + tile, n)
    width = t1 - t0
    dense = ids[t0] % _LANES == 0 and np.int64(ids[t1 - 1]) - np.int64(ids[t0]) == width - 1
    if dense:  # one block per 4 ids
      blocks = (width + _LANES - 1) // _LANES
      for g in range(blocks):
        counters[g] = np.uint32(ids[t0] // _LANES + g)
    else:  # one block per id
      blocks = width
      for i in range(width):
        counters[i] = np.uint32(ids[t0 + i] // _LANES)
    for b in range(queries.shape[0]):
      k0, k1 = key_words[b, 0], key_words[b, 1]
      threefry_blocks(k0, k1, counters[:blocks], _HI_TAG, w0, w1)
      # Which blocks hold a candidate (hi <= top), in a loop the compiler vectorises: the lanes
      # are then read one by one only for those (about 4% of dense blocks at q = 0.01).
      if dense:
        for g in range(blocks):
          hit[g] = ((w0[g] & np.uint32(0xFFFF)) <= top) | ((w0[g] >> np.uint32(16)) <= top) | \
                   ((w1[g] & np.uint32(0xFFFF)) <= top) | ((w1[g] >> np.uint32(16)) <= top)
      else:
        for g in range(blocks):
          hit[g] = _lane(w0[g], w1[g], ids[t0 + g] % _LANES) <= top
      for g in range(blocks):
        if not hit[g]:
          continue
        for i in range(_LANES * g, min(_LANES * (g + 1), width)) if dense else range(g, g + 1):
          r = ids[t0 + i]
          hi = _lane(w0[g], w1[g], r % _LANES)
          if hi > top:
            continue
          if hi == top:  # 1 in 65,536: the lo half decides
            l0, l1 = threefry2x32(k0, k1, np.uint32(r // _LANES), np.uint32(_LO_TAG))
            if _lane(l0, l1, r % _LANES) > low:
              continue
          s = np.float32(0.0)
          for j in range(d):
            s += rows[t0 + i, j] * queries[b, j]
          _insert(scores, positions, b, s, first_position + t0 + i)


def tile_rows(dim: int) -> int:
  """Rows per tile for embeddings of width dim: about TILE_BYTES of float32, a multiple of 4."""
  return max(_LANES, TILE_BYTES // (4 * dim) // _LANES * _LANES)
