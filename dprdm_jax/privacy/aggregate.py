"""The DP aggregation kernel: k retrieved private embeddings -> noisy cross-attention context.

SPEC steps 4-7, for each query independently (the kernel is vmapped over the batch):

  r_j  = clip(x_j)  if slot j holds a record, else 0      clip: scale to L2 norm <= 1, in float32
  m    = (1/k) * sum_j r_j                                 always divided by k, padded slots included
  m~   = m + sigma * xi,   xi ~ N(0, I_d)                  xi from the query's own NOISE key
  C    = lam * m~ + (1 - lam) * Q                          Q: the unit query, or k public neighbours

Formal guarantee (rule R2). Let two private datasets differ by adding or removing one record, and
let the retrieval step return the exact top-k of the same Poisson subsample of the shared records
(rule R1, the retrieval layer's job). Then at most one of the k slots differs, each slot's value has
L2 norm <= 1 after clipping, so m moves by at most 2/k in L2 norm: the L2 sensitivity of m is 2/k
and m~ is the Gaussian mechanism with noise multiplier z = sigma / (2/k) = k*sigma/2 (the value
`accounting.Mechanism.noise_multiplier` charges). A non-finite neighbour is treated as the zero
vector, so no input can break the bound. The interpolation and the public neighbours are
post-processing of m~ and public data.

Not guaranteed here: that the neighbours really came from a fresh subsample (R1), that the noise
key was never used before (R3: keys come from `keys.query_keys` with ledger-issued numbers), and
that the query was charged (R5). The output is not renormalised: renormalising would be harmless
post-processing but it is not what the model was trained to read.

Without public neighbours the k context rows are identical, and cross-attention to k identical
tokens equals attention to one, so the compact (B, 1, d) context is returned; writing the k-fold
repeat would cost as much memory traffic as reading the input.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def clip_to_unit_ball(x: jax.Array) -> jax.Array:
  """Scales each row of x (..., d) to L2 norm <= 1 in float32; non-finite rows become zero.

  Guarantee: every output row has norm <= 1 up to float32 rounding (a few ulps), whatever the input
  dtype or values, including bfloat16 rows whose rounding pushed them above 1.
  """
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  scale = jnp.minimum(1.0, 1.0 / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
  return jnp.where(jnp.isfinite(norm), x * scale, 0.0)


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def noisy_mean(neighbors: jax.Array, valid: jax.Array, noise_key: jax.Array,
               noise_std: jax.Array) -> jax.Array:
  """One query's noisy mean m~ (d,) of its neighbours (k, d) with validity mask (k,).

  Guarantee: the Gaussian mechanism on a statistic of L2 sensitivity 2/k (module docstring), with
  noise N(0, noise_std^2 I) drawn from noise_key alone.
  """
  k, d = neighbors.shape
  slots = jnp.where(valid[:, None], clip_to_unit_ball(neighbors), 0.0)
  mean = jnp.sum(slots, axis=0) / k
  return mean + noise_std * jax.random.normal(noise_key, (d,), jnp.float32)


def _context(neighbors, valid, query, noise_key, noise_std, interpolation, public_neighbors):
  private = noisy_mean(neighbors, valid, noise_key, noise_std)
  other = _normalise(query)[None] if public_neighbors is None else public_neighbors.astype(jnp.float32)
  return interpolation * private[None] + (1.0 - interpolation) * other


@jax.jit
def aggregate(neighbors: jax.Array,
              valid: jax.Array,
              queries: jax.Array,
              noise_keys: jax.Array,
              noise_std: jax.Array,
              interpolation: jax.Array,
              public_neighbors: Optional[jax.Array] = None) -> jax.Array:
  """The DP-RDM cross-attention context for a batch of queries.

  Args:
    neighbors: (B, k, d) retrieved private embeddings, float32 or bfloat16, any norm.
    valid: (B, k) bool, False for a slot the subsample could not fill.
    queries: (B, d) query embeddings (normalised here).
    noise_keys: (B,) typed key array from `keys.query_keys(..., Stream.NOISE)`, one per query.
    noise_std: sigma, the standard deviation of the noise added to the mean (a scalar).
    interpolation: lambda in [0, 1], the weight of the private part (a scalar).
    public_neighbors: optional (B, k, d) public neighbours that replace the query in the
      interpolation.

  Returns:
    float32 context, (B, 1, d) without public neighbours, else (B, k, d).

  Guarantee: each query's output is post-processing of the Gaussian mechanism with L2 sensitivity
  2/k and noise multiplier k*sigma/2 (module docstring), given an R1 retrieval and fresh keys.
  """
  b, k, d = neighbors.shape
  if valid.shape != (b, k) or queries.shape != (b, d) or noise_keys.shape != (b,):
    raise ValueError(
        f"shapes disagree: neighbors {neighbors.shape}, valid {valid.shape} (want {(b, k)}), "
        f"queries {queries.shape} (want {(b, d)}), noise_keys {noise_keys.shape} (want {(b,)})")
  if public_neighbors is not None and public_neighbors.shape != neighbors.shape:
    raise ValueError(f"public_neighbors {public_neighbors.shape} must match neighbors {neighbors.shape}")
  noise_std = jnp.asarray(noise_std, jnp.float32)
  interpolation = jnp.asarray(interpolation, jnp.float32)
  per_query = jax.vmap(_context, in_axes=(0, 0, 0, 0, None, None, None if public_neighbors is None else 0))
  return per_query(neighbors, valid.astype(bool), queries, noise_keys, noise_std, interpolation,
                   public_neighbors)
