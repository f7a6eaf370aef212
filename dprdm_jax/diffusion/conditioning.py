"""Training-time cross-attention contexts: the paper's "Adapt" context and the null context.

At generation time the model reads m~ = (1/k) sum_j r_j + sigma * xi, the noisy mean of k retrieved
private embeddings (`privacy.aggregate`). "Adapt" training (SPEC section 3) shows the model the same
kind of input built from public data: the mean of the k nearest public neighbours of each training
image (itself included) plus N(0, s^2 I) noise with a per-example scale s ~ U(0, sigma_max]
(sigma_max = 0.05 in the paper), so that it learns to read a noisy mean. Conditioning dropout
replaces the whole context by zeros with probability p_uncond, which trains the unconditional
branch that classifier-free guidance needs (the sampler's default null context is zeros too).

Shapes: neighbours (B, k, d) -> context (B, 1, d), float32. One token suffices: cross-attention
to k identical tokens equals attention to one (the k softmax weights are equal and sum to 1, so the
output is that token's value), which is why the generation path also keeps the compact (B, 1, d)
context. The embeddings are used as given: like the aggregation kernel's inputs they are expected
to be unit-norm (the kernel clips to norm <= 1, a no-op on normalised embeddings).
"""

import numbers

import jax
import jax.numpy as jnp

from dprdm_jax import errors


def null_context(batch: int, d: int) -> jax.Array:
  """The unconditional context: zeros (batch, 1, d), float32."""
  return jnp.zeros((batch, 1, d), jnp.float32)


def adapt_context(key: jax.Array, neighbors: jax.Array, sigma_max: float,
                  p_uncond: float) -> jax.Array:
  """The "Adapt" training context of each example: (B, 1, d) float32.

  context_b = (1/k) sum_j neighbors[b, j] + s_b * xi_b,  s_b ~ U(0, sigma_max],  xi_b ~ N(0, I_d),
  and with probability p_uncond, independently per example, context_b = 0 exactly.

  Randomness: `scale_key, noise_key, drop_key = jax.random.split(key, 3)`; s_b = sigma_max * (1 - u)
  with u ~ U[0, 1) from scale_key (so s_b > 0 whenever sigma_max > 0), xi from noise_key and the
  dropout decisions from drop_key. The same key gives the same context.

  Args:
    key: a PRNG key; use a fresh one per training step.
    neighbors: (B, k, d) embeddings of the k public neighbours of each training image.
    sigma_max: the largest noise scale, a Python number >= 0 (0: the plain mean, no noise).
    p_uncond: the conditioning-dropout probability, a Python number in [0, 1].
  """
  if not isinstance(sigma_max, numbers.Real) or not sigma_max >= 0:
    raise errors.InputError(f"sigma_max must be a number >= 0, got {sigma_max!r}")
  if not isinstance(p_uncond, numbers.Real) or not 0 <= p_uncond <= 1:
    raise errors.InputError(f"p_uncond must be a number in [0, 1], got {p_uncond!r}")
  if neighbors.ndim != 3 or neighbors.shape[1] < 1:
    raise errors.InputError(f"neighbors must be (B, k, d) with k >= 1, got shape {neighbors.shape}")
  b, _, d = neighbors.shape
  scale_key, noise_key, drop_key = jax.random.split(key, 3)
  scale = sigma_max * (1.0 - jax.random.uniform(scale_key, (b, 1, 1), jnp.float32))
  noisy = (jnp.mean(neighbors.astype(jnp.float32), axis=1, keepdims=True)
           + scale * jax.random.normal(noise_key, (b, 1, d), jnp.float32))
  drop = jax.random.bernoulli(drop_key, p_uncond, (b, 1, 1))
  return jnp.where(drop, 0.0, noisy)
