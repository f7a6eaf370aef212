"""Per-query random key streams (rule R3).

Every random draw that touches private data, the Poisson subsample of query t and the Gaussian
noise added to its aggregate, comes from a key derived here from three things only: the ledger's
secret 64-bit seed for the private dataset, the 64-bit nonce of the grant that holds the query
(fresh from the OS's CSPRNG for every charge) and the query's sequence number t, which the ledger
hands out once (`ledger.Ledger.charge`). The derivation is

    base(seed, nonce)       = fold_in(fold_in(root(seed), nonce_hi), nonce_lo)
    key(seed, nonce, s, t)  = fold_in(fold_in(fold_in(base(seed, nonce), s), t_hi), t_lo)

with threefry2x32 whatever `jax_default_prng_impl` says, so a key is the same on every back-end and
every run.

Formal guarantee: distinct (nonce, stream, t) triples give distinct keys up to the collision
probability of the threefry PRF. As long as the ledger never hands out the same (nonce, t) twice,
no mask and no noise draw is ever reused, across batches, processes and restarts; the nonce keeps
that true when a copied or rolled-back ledger file hands out a sequence number again. The subsample
stream and the noise stream of the same query are independent. A batch of B prompts is B queries with B numbers,
so each gets its own mask and noise.

The seed is as secret as the private data: whoever knows it and t can subtract the noise.
"""

import enum

import jax
import numpy as np

from dprdm_jax import errors

_IMPL = "threefry2x32"
_WORD = 0xFFFFFFFF
MAX_QUERIES = 2**64  # query numbers lie in [0, MAX_QUERIES)


class Stream(enum.IntEnum):
  """The independent random streams of one query."""
  SUBSAMPLE = 0  # Poisson membership of each private record
  NOISE = 1  # Gaussian noise added to the aggregate


def root_key(seed: int) -> jax.Array:
  """The root key of a ledger seed (an integer in [0, 2**64))."""
  if not 0 <= seed < 2**64:
    raise errors.InputError(f"seed must be an integer in [0, 2**64), got {seed}")
  return jax.random.wrap_key_data(np.array([seed >> 32, seed & _WORD], np.uint32), impl=_IMPL)


@jax.jit
def _derive(root: jax.Array, nonce: jax.Array, stream: jax.Array, hi: jax.Array,
            lo: jax.Array) -> jax.Array:
  base = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, nonce[0]), nonce[1]),
                            stream)
  return jax.vmap(lambda h, l: jax.random.fold_in(jax.random.fold_in(base, h), l))(hi, lo)


def query_keys(seed: int, first_query: int, count: int, stream: Stream,
               nonce: int = 0) -> jax.Array:
  """Keys of queries first_query, ..., first_query + count - 1 in one stream: a (count,) key array.

  nonce: the grant's nonce in [0, 2**64) (`ledger.Grant.keys` always passes its own; 0 is for
  tests and benchmarks, which hold no grant).

  Guarantee: see the module docstring; the key of query t depends on (seed, nonce, stream, t)
  alone, so the same query gets the same key in any batch layout, and two different queries never
  share one.
  """
  if not 0 <= nonce < 2**64:
    raise errors.InputError(f"nonce must be an integer in [0, 2**64), got {nonce}")
  if count < 1:
    raise errors.InputError(f"count must be at least 1, got {count}")
  if first_query < 0 or first_query + count > MAX_QUERIES:
    raise errors.InputError(
        f"query numbers must lie in [0, 2**64), got [{first_query}, {first_query + count})")
  t = np.arange(count, dtype=np.uint64) + np.uint64(first_query)
  hi = (t >> np.uint64(32)).astype(np.uint32)
  lo = (t & np.uint64(_WORD)).astype(np.uint32)
  words = np.array([nonce >> 32, nonce & _WORD], np.uint32)
  return _derive(root_key(seed), words, np.uint32(Stream(stream)), hi, lo)
