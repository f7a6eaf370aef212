"""What benchmarks/retrieval.py and retrieval_large.py share: the query settings' flags, our
subsample's ids for faiss (a), and the slot-by-slot comparison of two contenders' answers."""

from absl import flags
import jax.numpy as jnp
import numpy as np

from dprdm_jax.privacy import keys
from dprdm_jax.retrieval import subsample

BATCH = flags.DEFINE_integer("batch", 256, "Queries per pass (B).")
NEIGHBORS = flags.DEFINE_integer("neighbors", 16, "Neighbours per query (k).")
SAMPLING_RATE = flags.DEFINE_float("sampling_rate", 0.01, "Poisson subsampling rate q.")
TIE_TOLERANCE = flags.DEFINE_float("tie_tolerance", 1e-6,
                                   "Slots whose ids differ count as ties below this score gap.")
SEED = flags.DEFINE_integer("seed", 20240601, "Seed of the data, the queries and the keys.")

ROWS, QUERIES = 1 << 20, 32  # the slices of membership calls: XLA's temporaries stay small


def sampled_ids(n: int, b: int, seed: int, q: float) -> list[np.ndarray]:
  """Each of the B queries' subsamples of ids 0..N-1, by our keyed hash (`subsample.membership`),
  as sorted int64 ids: what faiss (a) is given."""
  sub_keys = keys.query_keys(seed, 0, b, keys.Stream.SUBSAMPLE)
  keep, parts = subsample.limit(q), [[] for _ in range(b)]
  for lo in range(0, n, ROWS):
    ids = jnp.arange(lo, min(n, lo + ROWS), dtype=jnp.uint32)
    for s in range(0, b, QUERIES):
      member = np.asarray(subsample.membership(sub_keys[s:s + QUERIES], ids, keep))
      for i, row in enumerate(member):
        parts[s + i].append(np.flatnonzero(row) + lo)
  return [np.concatenate(p) for p in parts]


def compare(a, b, tolerance: float) -> tuple[int, int, float]:
  """Two answers (ids, scores, valid), each (B, k): (slots whose ids differ, of those the ones
  that are not ties within `tolerance`, max |score difference|)."""
  (ids_a, scores_a, valid_a), (ids_b, scores_b, valid_b) = a, b
  differ = (ids_a != ids_b) | (valid_a != valid_b)
  gap = np.abs(scores_a.astype(np.float64) - scores_b.astype(np.float64))
  gap = np.where(valid_a & valid_b, gap, 0.0)
  return int(differ.sum()), int((differ & ~(gap <= tolerance)).sum()), float(gap.max())
