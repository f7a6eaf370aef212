"""The DP aggregation kernel: k retrieved private embeddings -> noisy cross-attention context.

SPEC steps 4-7, for each query independently (the kernel is vmapped over the batch):

  r_j  = clip(x_j)  if slot j holds a record, else 0      clip: scale to L2 norm <= 1, in float32
  m    = (1/k) * sum_j r_j                                 always divided by k, padded slots too
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

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors


def _clip_scales(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row factors that scale x (..., d) to L2 norm <= 1, and whether each row is finite."""
  sq = jnp.sum(x * x, axis=-1)
  scale = jnp.minimum(1.0, jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny)))
  return scale, jnp.isfinite(sq)


def clip_to_unit_ball(x: jax.Array) -> jax.Array:
  """Scales each row of x (..., d) to L2 norm <= 1 in float32; non-finite rows become zero.

  Guarantee: every output row has norm <= 1 up to float32 rounding (a few ulps), whatever the input
  dtype or values, including bfloat16 rows whose rounding pushed them above 1.
  """
  x = x.astype(jnp.float32)
  scale, finite = _clip_scales(x)
  return jnp.where(finite[..., None], x * scale[..., None], 0.0)


def clipped_mean(neighbors: jax.Array, valid: jax.Array) -> jax.Array:
  """(1/k) * sum of the clipped valid rows of neighbors (..., k, d), in float32.

  Guarantee: the statistic of L2 sensitivity 2/k under add-or-remove-one (module docstring). Invalid
  and non-finite rows count as zero vectors; the divisor is always k.
  """
  x = neighbors.astype(jnp.float32)
  scale, finite = _clip_scales(x)
  usable = valid & finite
  weight = jnp.where(usable, scale, 0.0) / x.shape[-2]
  # 0 * nan is nan, so a non-finite row needs a select on x; skip that pass when none exists.
  # HIGHEST: on TPUs and on Ampere-or-newer GPUs the default precision rounds the operands to
  # bf16/TF32 after the clip, which can push a row's norm, and the sensitivity, above the bound.
  weighted_sum = functools.partial(jnp.einsum, "...k,...kd->...d",
                                   precision=jax.lax.Precision.HIGHEST)
  return jax.lax.cond(
      jnp.all(finite),
      lambda: weighted_sum(weight, x),
      lambda: weighted_sum(weight, jnp.where(usable[..., None], x, 0.0)))


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _blocked_clipped_mean(neighbors, valid, block_size):
  """clipped_mean over the batch in blocks of block_size queries (same result, better locality)."""
  b = neighbors.shape[0]
  if block_size is None or block_size >= b:
    return clipped_mean(neighbors, valid)
  n = b // block_size
  blocks = jax.tree.map(lambda a: a[:n * block_size].reshape(n, block_size, *a.shape[1:]),
                        (neighbors, valid))
  means = jax.lax.map(lambda a: clipped_mean(*a), blocks).reshape(n * block_size, -1)
  if n * block_size < b:
    tail = n * block_size
    means = jnp.concatenate([means, clipped_mean(neighbors[tail:], valid[tail:])])
  return means


# On a CPU the kernel reads each neighbour twice (its norm, then the weighted sum). A batch larger
# than _CPU_FLAT_BYTES is processed in blocks of about _CPU_BLOCK_BYTES, so that the second read
# hits the cache (1.8x at k = 64, d = 384, B = 1024 on 2 cores; measured with block_size=None).
_CPU_FLAT_BYTES = 8 << 20
_CPU_BLOCK_BYTES = 1 << 20


def default_block_size(neighbors: jax.Array) -> Optional[int]:
  """Queries per block for `aggregate` on this input: blocks for large batches on one CPU device.

  A batch sharded over several devices is not blocked: a loop over a sharded axis would gather it.
  """
  if jax.default_backend() != "cpu" or isinstance(neighbors, jax.core.Tracer):
    return None
  sharding = getattr(neighbors, "sharding", None)
  if sharding is not None and len(sharding.device_set) > 1:
    return None
  b, k, d = neighbors.shape
  row = k * d * 4  # bytes of one query's neighbours in float32
  if b * row <= _CPU_FLAT_BYTES:
    return None
  return 2 ** int(np.log2(max(1, _CPU_BLOCK_BYTES // row)))


@functools.partial(jax.jit, static_argnames=("block_size",))
def _aggregate(neighbors, valid, queries, noise_keys, noise_std, interpolation, public_neighbors,
               block_size):
  b, k, d = neighbors.shape
  if valid.shape != (b, k) or queries.shape != (b, d) or noise_keys.shape != (b,):
    raise errors.InputError(
        f"shapes disagree: neighbors {neighbors.shape}, valid {valid.shape} (want {(b, k)}), "
        f"queries {queries.shape} (want {(b, d)}), noise_keys {noise_keys.shape} (want {(b,)})")
  if public_neighbors is not None and public_neighbors.shape != neighbors.shape:
    raise errors.InputError(f"public_neighbors {public_neighbors.shape} must match neighbors "
                            f"{neighbors.shape}")
  noise_std = jnp.asarray(noise_std, jnp.float32)
  interpolation = jnp.asarray(interpolation, jnp.float32)
  means = _blocked_clipped_mean(neighbors, valid.astype(bool), block_size)
  noise = jax.vmap(lambda key: jax.random.normal(key, (d,), jnp.float32))(noise_keys)
  private = (means + noise_std * noise)[:, None]  # (B, 1, d): m~ of each query
  other = _normalise(queries)[:, None] if public_neighbors is None else public_neighbors.astype(
      jnp.float32)
  return interpolation * private + (1.0 - interpolation) * other


def aggregate(neighbors: jax.Array,
              valid: jax.Array,
              queries: jax.Array,
              noise_keys: jax.Array,
              noise_std: jax.Array,
              interpolation: jax.Array,
              public_neighbors: Optional[jax.Array] = None,
              block_size: Optional[int] = -1) -> jax.Array:
  """The DP-RDM cross-attention context for a batch of queries (one jitted function).

  Args:
    neighbors: (B, k, d) retrieved private embeddings, float32 or bfloat16, any norm.
    valid: (B, k) bool, False for a slot the subsample could not fill.
    queries: (B, d) query embeddings (normalised here).
    noise_keys: (B,) typed key array from `keys.query_keys(..., Stream.NOISE)`, one per query.
    noise_std: sigma, the standard deviation of the noise added to the mean (a scalar).
    interpolation: lambda in [0, 1], the weight of the private part (a scalar).
    public_neighbors: optional (B, k, d) public neighbours that replace the query in the
      interpolation.
    block_size: queries per block of the loop over the batch, None for no loop, -1 (default) for
      `default_block_size`. Speed only: every block size gives the same output.

  Returns:
    float32 context, (B, 1, d) without public neighbours, else (B, k, d).

  Guarantee: each query's output is post-processing of the Gaussian mechanism with L2 sensitivity
  2/k and noise multiplier k*sigma/2 (module docstring), given an R1 retrieval and fresh keys.
  """
  if block_size == -1:
    block_size = default_block_size(neighbors)
  return _aggregate(neighbors, valid, queries, noise_keys, noise_std, interpolation,
                    public_neighbors, block_size)
