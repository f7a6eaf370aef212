"""Per-query random key streams (rule R3).

Every random draw that touches private data, the Poisson subsample of query t and the Gaussian
noise added to its aggregate, comes from a key derived here from two things only: the ledger's
secret 64-bit seed for the private dataset and the query's global sequence number t, which the
ledger hands out once (`ledger.Ledger.charge`). The derivation is

    key(seed, stream, t) = fold_in(fold_in(fold_in(root(seed), stream), t_hi), t_lo)

with threefry2x32 whatever `jax_default_prng_impl` says, so a key is the same on every back-end and
every run.

Formal guarantee: distinct (stream, t) pairs give distinct keys up to the collision probability of
the threefry PRF. As long as the ledger never hands out a sequence number twice, no mask and no
noise draw is ever reused, across batches, processes and restarts; and the subsample stream and the
noise stream of the same query are independent. A batch of B prompts is B queries with B numbers,
so each gets its own mask and noise.

The seed is as secret as the private data: whoever knows it and t can subtract the noise.
"""

import enum

import jax
import numpy as np

_IMPL = "threefry2x32"
_WORD = 0xFFFFFFFF


class Stream(enum.IntEnum):
  """The independent random streams of one query."""
  SUBSAMPLE = 0  # Poisson membership of each private record
  NOISE = 1  # Gaussian noise added to the aggregate


def root_key(seed: int) -> jax.Array:
  """The root key of a ledger seed (an integer in [0, 2**64))."""
  if not 0 <= seed < 2**64:
    raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
  return jax.random.wrap_key_data(np.array([seed >> 32, seed & _WORD], np.uint32), impl=_IMPL)


@jax.jit
def _derive(root: jax.Array, stream: jax.Array, hi: jax.Array, lo: jax.Array) -> jax.Array:
  base = jax.random.fold_in(root, stream)
  return jax.vmap(lambda h, l: jax.random.fold_in(jax.random.fold_in(base, h), l))(hi, lo)


def query_keys(seed: int, first_query: int, count: int, stream: Stream) -> jax.Array:
  """Keys of queries first_query, ..., first_query + count - 1 in one stream: a (count,) key array.

  Guarantee: see the module docstring; the key of query t depends on (seed, stream, t) alone, so the
  same query gets the same key in any batch layout, and two different queries never share one.
  """
  if count < 1:
    raise ValueError(f"count must be at least 1, got {count}")
  if first_query < 0 or first_query + count > 2**64:
    raise ValueError(
        f"query numbers must lie in [0, 2**64), got [{first_query}, {first_query + count})")
  t = np.arange(count, dtype=np.uint64) + np.uint64(first_query)
  hi = (t >> np.uint64(32)).astype(np.uint32)
  lo = (t & np.uint64(_WORD)).astype(np.uint32)
  return _derive(root_key(seed), np.uint32(Stream(stream)), hi, lo)
