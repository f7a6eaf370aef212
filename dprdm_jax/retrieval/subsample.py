"""Poisson subsampling by a keyed pseudorandom function of record ids (rules R1 and R3).

Query t keeps record r iff  h(t, r) <= limit(q),  where

  key_t    = subsample_key(t)                            threefry: fresh and secret per query
  h(t, r)  = the first word of Threefry-2x32(key_t, (r, 0))   20 rounds, as jax.random uses
  limit(q) = floor(q * 2**32) - 1

subsample_key(t) is `keys.query_keys(seed, t, 1, Stream.SUBSAMPLE)`. Each record is kept with
probability floor(q * 2**32) / 2**32 (q up to 2.4e-10, never above it: accounting with q is then
conservative, since amplification by subsampling only improves as the rate drops), independently
of every other record and query, under one computational assumption: that Threefry-2x32-20 keyed
by a secret 64-bit key cannot be told apart from a random function. It is the assumption all of
jax.random rests on (so the noise of every JAX DP library, jax_privacy's included, rests on it
too), and the one that replaces the proof's true coin flips here.

Cost: Threefry is about three times the integer work of the two-round 32-bit mixer this module
used before (24.2 vs 7.8 ms a query to hash N = 10**6 ids, B = 32, one run on the loaded 2-core
VM, 2026-12-03). The mixer was statistically sound but no pseudorandom function: the membership
bits of a few dozen records pinned down its 64-bit key, and with it every other record's.

Formal guarantee: a record's membership depends on (seed, t, its id) alone, not on its position,
the other records, or the back-end, so the host and device retrievals agree on every subsample, a
record added to or removed from the dataset changes no other record's membership, and a fresh query
number gives a fresh subsample.
"""

import jax
from jax.extend import random as jax_random
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors


def limit(sampling_rate: float) -> np.uint32:
  """The largest hash value that is kept at rate q, in [0, 2**32 - 1]."""
  if not 2.0**-32 <= sampling_rate <= 1.0:
    raise errors.InputError(f"sampling rate must lie in [2**-32, 1], got {sampling_rate}")
  return np.uint32(int(sampling_rate * 2**32) - 1)


def hash_ids(key: jax.Array, ids: jax.Array) -> jax.Array:
  """h(t, r) of the module docstring for one query's key and uint32 ids of any shape."""
  ids = ids.astype(jnp.uint32)
  flat = ids.reshape(-1)
  # threefry_2x32 encrypts the counter array's two halves as the two words of each block: the
  # ids are the first words and zeros the second, so each id is one block of its own.
  words = jax_random.threefry_2x32(jax.random.key_data(key),
                                   jnp.concatenate([flat, jnp.zeros_like(flat)]))
  return words[:flat.shape[0]].reshape(ids.shape)


@jax.jit
def membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, N) bool: whether query b's subsample holds record ids[n] (ids uint32, keep = limit(q)).

  Guarantee: see the module docstring. Costs one Threefry-2x32-20 block per (query, record).
  """
  return jax.vmap(lambda key: hash_ids(key, ids))(subsample_keys) <= keep


@jax.jit
def candidate_membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, C) bool for a per-query candidate list ids (B, C): the same decisions as `membership`."""
  return jax.vmap(hash_ids)(subsample_keys, ids) <= keep


@jax.jit
def record_membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(N, B) bool, record-major: `membership(...)` transposed, the same decisions.

  The layout of a scan over a table: a record's row of B flags is contiguous, so the (record,
  query) pairs it lists come out in record order (XLA writes the transposed layout directly).
  """
  return jax.vmap(lambda key: hash_ids(key, ids), out_axes=1)(subsample_keys) <= keep

