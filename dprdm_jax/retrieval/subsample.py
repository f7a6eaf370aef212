"""Poisson subsampling by a keyed pseudorandom function of record ids (rules R1 and R3).

Query t keeps record r iff  h(t, r) <= limit(q),  where

  key_t    = subsample_key(t)                  threefry: fresh and secret per query
  h(t, r)  = hi(t, r) * 2**16 + lo(t, r)       a 32-bit value from two Threefry blocks:
  hi(t, r) = 16-bit lane (r mod 4) of Threefry-2x32(key_t, (r div 4, 1))
  lo(t, r) = 16-bit lane (r mod 4) of Threefry-2x32(key_t, (r div 4, 2))
  limit(q) = floor(q * 2**32) - 1

Threefry-2x32 has 20 rounds, as jax.random uses it; a block's two output words are read as four
16-bit lanes, word 0 first, the low half of each word first. Each record is kept with probability
floor(q * 2**32) / 2**32 (q up to 2.4e-10, never above it: accounting with q is then conservative,
since amplification by subsampling only improves as the rate drops), independently of every
other record and query, under one computational assumption: that Threefry-2x32-20 keyed by a
secret 64-bit key cannot be told apart from a random function. Then every bit of every block is
an independent fair coin, a record's 32 bits are its own (its lane of each block is read by no
other record), and h(t, r) is uniform on [0, 2**32). It is the assumption all of jax.random rests
on (so the noise of every JAX DP library, jax_privacy's included, rests on it too), and the one
that replaces the proof's true coin flips here.

Why lanes. Deciding h <= limit needs lo only when hi equals limit's top 16 bits, for 1 record in
65,536. A scan over ids that run in aligned groups of 4 (`dense_ids`: every store the project
writes) therefore computes one block per 4 records and the lo block of the rare ties only
(`scan_kernel`, the host's scan): a quarter of the Threefry work of one block per record.
Computing both halves for every record (`membership`, the device path) costs half a block per
record for dense ids, 2 for ids in no such groups (each record's blocks on their own). Every path
computes the same h, so the host and device retrievals agree on every subsample.

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

HI_TAG, LO_TAG = 1, 2  # the second counter word of the two kinds of block
LANES = 4  # 16-bit lanes per block: records per block


def limit(sampling_rate: float) -> np.uint32:
  """The largest hash value that is kept at rate q, in [0, 2**32 - 1]."""
  if not 2.0**-32 <= sampling_rate <= 1.0:
    raise errors.InputError(f"sampling rate must lie in [2**-32, 1], got {sampling_rate}")
  return np.uint32(int(sampling_rate * 2**32) - 1)


def _lanes(key: jax.Array, counters: jax.Array, tag: int) -> jax.Array:
  """(n, 4) uint32 16-bit lanes of the Threefry-2x32-20 blocks of (counters[i], tag) under key:
  word 0's low and high half, then word 1's."""
  # threefry_2x32 encrypts the counter array's two halves as the two words of each block.
  words = jax_random.threefry_2x32(
      jax.random.key_data(key), jnp.concatenate([counters, jnp.full_like(counters, tag)]))
  w0, w1 = words[:counters.shape[0]], words[counters.shape[0]:]
  return jnp.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16], axis=1)


def _half(key: jax.Array, ids: jax.Array, tag: int) -> jax.Array:
  """hi (tag 1) or lo (tag 2) of uint32 ids (n,), each record's block computed on its own."""
  lanes = _lanes(key, ids // LANES, tag)
  return jnp.take_along_axis(lanes, (ids % LANES)[:, None].astype(jnp.int32), axis=1)[:, 0]


def _half_dense(key: jax.Array, first_group: jax.Array, groups: int, tag: int) -> jax.Array:
  """hi or lo of the 4 * groups ids from 4 * first_group on: one block per 4 ids."""
  counters = first_group.astype(jnp.uint32) + jnp.arange(groups, dtype=jnp.uint32)
  return _lanes(key, counters, tag).reshape(-1)


def hash_ids(key: jax.Array, ids: jax.Array) -> jax.Array:
  """h(t, r) of the module docstring for one query's key and uint32 ids of any shape."""
  flat = ids.astype(jnp.uint32).reshape(-1)
  return ((_half(key, flat, HI_TAG) << 16) | _half(key, flat, LO_TAG)).reshape(ids.shape)


def dense_ids(ids) -> bool:
  """Whether ids ((n,), n > 0 a multiple of 4) run in aligned groups of 4, ids[4j + l] =
  4 * (ids[4j] div 4) + l. Works on numpy arrays and inside jit (a traced bool)."""
  xp = jnp if isinstance(ids, jax.Array) else np
  if ids.shape[0] % LANES or ids.shape[0] == 0:
    return False if xp is np else jnp.bool_(False)
  groups = ids.reshape(-1, LANES).astype(np.int64 if xp is np else jnp.uint32)
  lanes = xp.arange(LANES, dtype=groups.dtype)
  return xp.all((groups[:, :1] % LANES == 0) & (groups == groups[:, :1] + lanes))


def _keep(hi, lo, keep):
  """h <= keep from h's two halves."""
  keep = jnp.asarray(keep, jnp.uint32)
  return (hi < keep >> 16) | ((hi == keep >> 16) & (lo <= (keep & 0xFFFF)))


@jax.jit
def membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, N) bool: whether query b's subsample holds record ids[n] (ids uint32, keep = limit(q)).

  Guarantee: see the module docstring. Costs half a Threefry-2x32-20 block per (query, record)
  when the ids are `dense_ids`, 2 blocks otherwise.
  """
  ids = ids.astype(jnp.uint32)
  general = lambda: jax.vmap(
      lambda key: _keep(_half(key, ids, HI_TAG), _half(key, ids, LO_TAG), keep))(subsample_keys)
  if ids.shape[0] % LANES or ids.shape[0] == 0:
    return general()
  groups = ids.shape[0] // LANES

  def dense():
    first = ids[0] // LANES
    return jax.vmap(lambda key: _keep(_half_dense(key, first, groups, HI_TAG),
                                      _half_dense(key, first, groups, LO_TAG), keep))(
                                          subsample_keys)

  return jax.lax.cond(dense_ids(ids), dense, general)


@jax.jit
def candidate_membership(subsample_keys: jax.Array, ids: jax.Array, keep: np.uint32) -> jax.Array:
  """(B, C) bool for a per-query candidate list ids (B, C): the same decisions as `membership`."""
  ids = ids.astype(jnp.uint32)
  return jax.vmap(lambda key, row: _keep(_half(key, row, HI_TAG), _half(key, row, LO_TAG),
                                         keep))(subsample_keys, ids)
