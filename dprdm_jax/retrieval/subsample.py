"""Poisson subsampling by a keyed hash of record ids (rules R1 and R3).

Query t keeps record r iff  h(t, r) <= limit(q),  where

  h(t, r) = word 0 of fold_in(subsample_key(t), r)      a threefry2x32 output, uniform on [0, 2**32)
  limit(q) = floor(q * 2**32) - 1

subsample_key(t) is `keys.query_keys(seed, t, 1, Stream.SUBSAMPLE)`. For a fixed query the words of
distinct records are outputs of the threefry PRF on distinct inputs, so each record is kept
independently with probability floor(q * 2**32) / 2**32, which is q up to 2.4e-10 and never above
it (accounting with q is then conservative: amplification by subsampling only improves as the
rate drops).

Formal guarantee: a record's membership depends on (seed, t, its id) alone, not on its position,
the other records, or the back-end, so the host and device retrievals agree on every subsample, a
record added to or removed from the dataset changes no other record's membership, and a fresh query
number gives a fresh, independent subsample.
"""

import jax
import numpy as np


def limit(sampling_rate: float) -> np.uint32:
  """The largest hash value that is kept at rate q, in [0, 2**32 - 1]."""
  if not 2.0**-32 <= sampling_rate <= 1.0:
    raise ValueError(f"sampling rate must lie in [2**-32, 1], got {sampling_rate}")
  return np.uint32(int(sampling_rate * 2**32) - 1)


def _word(key: jax.Array, record_id: jax.Array) -> jax.Array:
  return jax.random.key_data(jax.random.fold_in(key, record_id))[0]


@jax.jit
def membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, N) bool: whether query b's subsample holds record ids[n] (ids uint32, keep = limit(q)).

  Guarantee: see the module docstring. Costs one threefry call per (query, record).
  """
  words = jax.vmap(lambda key: jax.vmap(lambda r: _word(key, r))(ids))(subsample_keys)
  return words <= keep


@jax.jit
def candidate_membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, C) bool for a per-query candidate list ids (B, C): the same decisions as `membership`."""
  return jax.vmap(lambda key, row: jax.vmap(lambda r: _word(key, r))(row))(subsample_keys,
                                                                          ids) <= keep

