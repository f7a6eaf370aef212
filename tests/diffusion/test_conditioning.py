"""The "Adapt" training context: mean of the neighbours, noise scale ~ U(0, sigma_max], dropout.

One neighbour array and two compiled programs serve all statistical tests (compiling the random
draws dominates the run time on CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dprdm_jax.diffusion import conditioning

B, K, D = 8192, 2, 256
SIGMA_MAX, P_UNCOND = 0.05, 0.1
NEIGHBORS = np.random.default_rng(0).normal(size=(B, K, D)).astype(np.float32)
ADAPT = jax.jit(conditioning.adapt_context, static_argnums=(2, 3))


@functools.cache
def draw(seed, sigma_max=SIGMA_MAX, p_uncond=P_UNCOND):
  return np.asarray(ADAPT(jax.random.key(seed), NEIGHBORS, sigma_max, p_uncond), np.float64)[:, 0]


def scale_cdf(x, d, sigma_max, grid=1000):
  """CDF of the estimated scale sqrt(mean of d squared N(0, s^2)) with s ~ U(0, sigma_max]."""
  u = (np.arange(grid) + 0.5) / grid  # midpoint rule over s / sigma_max
  return stats.chi2.cdf(d * (x[:, None] / (sigma_max * u[None, :]))**2, d).mean(axis=1)


def test_shape_and_the_mean_over_k():
  out = ADAPT(jax.random.key(0), NEIGHBORS[:16], 0.0, 0.0)
  assert out.shape == (16, 1, D) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, NEIGHBORS[:16].mean(axis=1, keepdims=True), rtol=1e-6)


def test_noise_scale_is_uniform_on_zero_to_sigma_max():
  out = draw(1)
  kept = ~np.all(out == 0.0, axis=1)
  noise = (out - NEIGHBORS.mean(axis=1))[kept]  # a wrong mean would show up here
  s_hat = np.sqrt(np.mean(noise**2, axis=1))
  assert np.all(s_hat > 0) and np.all(s_hat < 1.5 * SIGMA_MAX)
  # Exact law of the per-example estimate: s * chi_d / sqrt(d), s ~ U(0, sigma_max].
  assert stats.kstest(s_hat, lambda x: scale_cdf(x, D, SIGMA_MAX)).pvalue > 1e-3
  # Given its scale, each example's noise is N(0, s^2 I).
  assert stats.kstest((noise / s_hat[:, None])[:64].ravel(), "norm").pvalue > 1e-3


def test_dropout_fraction_and_exact_zeros():
  out = draw(1)
  dropped = np.all(out == 0.0, axis=1)
  assert abs(dropped.mean() - P_UNCOND) < 5 * np.sqrt(P_UNCOND * (1 - P_UNCOND) / B)
  assert not np.any((out == 0.0) & ~dropped[:, None])  # kept rows carry noise: no exact zeros


def test_same_key_same_context_and_different_keys_differ():
  a, c = draw(1), draw(2)
  np.testing.assert_array_equal(
      a, np.asarray(ADAPT(jax.random.key(1), NEIGHBORS, SIGMA_MAX, P_UNCOND), np.float64)[:, 0])
  both_kept = np.any(a != 0, axis=1) & np.any(c != 0, axis=1)
  assert not np.any(np.all(a == c, axis=1) & both_kept)
  assert not np.array_equal(np.all(a == 0, axis=1), np.all(c == 0, axis=1))


@pytest.mark.parametrize("sigma_max,p_uncond,shape", [
    (-0.1, 0.1, (2, 4, 8)), (0.05, 1.5, (2, 4, 8)), (0.05, -0.1, (2, 4, 8)),
    (0.05, 0.1, (2, 8)), (0.05, 0.1, (2, 0, 8))])
def test_invalid_arguments_are_refused(sigma_max, p_uncond, shape):
  with pytest.raises(ValueError):
    conditioning.adapt_context(jax.random.key(0), jnp.zeros(shape), sigma_max, p_uncond)


def test_null_context_and_one_token_equals_k_identical_tokens():
  null = conditioning.null_context(3, 8)
  assert null.shape == (3, 1, 8) and null.dtype == jnp.float32 and not np.any(np.asarray(null))
  # Cross-attention of 5 queries to one token or to k = 4 copies of it gives the same output.
  rng = np.random.default_rng(0)
  q, token = rng.normal(size=(5, 8)), rng.normal(size=(1, 8))

  def attend(ctx):
    w = np.exp(q @ ctx.T)
    return (w / w.sum(axis=1, keepdims=True)) @ ctx

  np.testing.assert_allclose(attend(token), attend(np.repeat(token, 4, axis=0)), rtol=1e-12)
