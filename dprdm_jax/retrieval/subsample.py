"""Poisson subsampling by a keyed hash of record ids (rules R1 and R3).

Query t keeps record r iff  h(t, r) <= limit(q),  where

  (k0, k1) = the two 32-bit words of subsample_key(t)    threefry: fresh and secret per query
  h(t, r)  = mix(mix(r ^ k0) ^ k1)                       mix: "lowbias32", a bijection of uint32
  limit(q) = floor(q * 2**32) - 1

subsample_key(t) is `keys.query_keys(seed, t, 1, Stream.SUBSAMPLE)`. For a fixed query, h is a
bijection of the 32-bit id space chosen by a 64-bit key, so distinct records get distinct, evenly
spread hash values and each record is kept with probability floor(q * 2**32) / 2**32: q up to
2.4e-10, never above it (accounting with q is then conservative, since amplification by subsampling
only improves as the rate drops).

Why not threefry per record: one threefry call per (query, record) cost 24 ms per query at
N = 10**6 on a 2-core CPU, more than scoring the records; the integer mixer costs about 40 times
less. The decisions are statistical, not cryptographic, randomness: the same standard as the
samplers of Opacus and TF Privacy (numpy's or torch's generators). The tests check the rate, the
size distribution of subsamples, and the independence of neighbouring ids and of queries.

Formal guarantee: a record's membership depends on (seed, t, its id) alone, not on its position,
the other records, or the back-end, so the host and device retrievals agree on every subsample, a
record added to or removed from the dataset changes no other record's membership, and a fresh query
number gives a fresh subsample.
"""

import jax
import jax.numpy as jnp
import numpy as np


def limit(sampling_rate: float) -> np.uint32:
  """The largest hash value that is kept at rate q, in [0, 2**32 - 1]."""
  if not 2.0**-32 <= sampling_rate <= 1.0:
    raise ValueError(f"sampling rate must lie in [2**-32, 1], got {sampling_rate}")
  return np.uint32(int(sampling_rate * 2**32) - 1)


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons' hash prospector): a bijection of uint32 with low avalanche bias."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_ids(key: jax.Array, ids: jax.Array) -> jax.Array:
  """h(t, r) of the module docstring for one query's key and uint32 ids of any shape."""
  k0, k1 = jax.random.key_data(key)
  return _mix(_mix(ids.astype(jnp.uint32) ^ k0) ^ k1)


@jax.jit
def membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, N) bool: whether query b's subsample holds record ids[n] (ids uint32, keep = limit(q)).

  Guarantee: see the module docstring. Costs about ten integer operations per (query, record).
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

