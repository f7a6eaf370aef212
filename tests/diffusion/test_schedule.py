"""Noise schedules: the paper's linear schedule at its ends, the cosine schedule, q_sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dprdm_jax.diffusion import schedule as schedule_lib


def test_linear_schedule_is_the_ldm_one():
  s = schedule_lib.linear()
  betas, ab = np.asarray(s.betas), np.asarray(s.alphas_cumprod)
  assert s.T == 1000 and betas.dtype == ab.dtype == np.float32
  np.testing.assert_allclose([betas[0], betas[-1]], [0.0015, 0.0195], rtol=1e-6)
  # Squares of a linspace of square roots: sqrt(beta) has constant increments.
  np.testing.assert_allclose(np.diff(np.sqrt(betas.astype(np.float64))),
                             (np.sqrt(0.0195) - np.sqrt(0.0015)) / 999, rtol=1e-4)
  assert np.all(np.diff(betas) > 0) and np.all(np.diff(ab) < 0)
  assert 0 < ab[-1] < ab[0] < 1
  np.testing.assert_allclose(ab[0], 1 - 0.0015, rtol=1e-7)
  np.testing.assert_allclose(ab[-1], 1.4230e-4, rtol=1e-4)  # float64 cumprod, then float32


def test_cosine_schedule():
  T, s = 1000, 0.008  # pylint: disable=invalid-name
  sched = schedule_lib.cosine(T, s)
  betas, ab = np.asarray(sched.betas, np.float64), np.asarray(sched.alphas_cumprod, np.float64)
  f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2)**2
  assert np.all(betas <= np.float32(0.999)) and betas[-1] == np.float32(0.999)
  assert np.all(np.diff(ab) < 0) and ab[-1] > 0
  # Before the clip bites, alpha-bar follows the closed form f(t + 1) / f(0).
  unclipped = np.flatnonzero(betas < 0.998)
  assert unclipped.size > 990
  np.testing.assert_allclose(ab[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-4, atol=1e-7)
  assert betas[0] < 1e-4 and abs(ab[T // 2] - 0.5) < 0.03  # slow start, half signal mid-way


@pytest.mark.parametrize("make", [
    lambda: schedule_lib.linear(0), lambda: schedule_lib.linear(10.5),
    lambda: schedule_lib.linear(True), lambda: schedule_lib.linear(10, 0.02, 0.01),
    lambda: schedule_lib.linear(10, 0.0, 0.01), lambda: schedule_lib.linear(10, 0.1, 1.0),
    lambda: schedule_lib.cosine(10, 0.0), lambda: schedule_lib.cosine(-1),
    lambda: schedule_lib.from_betas(np.array([0.1, 1.0])),
    lambda: schedule_lib.from_betas(np.zeros((0,)))])
def test_invalid_schedules_are_refused(make):
  with pytest.raises(ValueError):
    make()


def test_schedule_is_a_pytree_with_static_length():
  s = schedule_lib.linear(10)
  out = jax.jit(lambda sched: jnp.zeros(sched.T) + sched.alphas_cumprod)(s)
  np.testing.assert_array_equal(out, s.alphas_cumprod)
  assert len(jax.tree.leaves(s)) == 2


def test_q_sample_formula_and_statistics():
  s = schedule_lib.linear()
  t = jnp.array([0, 250, 500, 999], jnp.int32)
  mu, sd, n = 0.5, 0.3, 64 * 64 * 4
  rng = np.random.default_rng(0)
  x0 = (mu + sd * rng.normal(size=(4, 64, 64, 4))).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  xt = np.asarray(schedule_lib.q_sample(s, x0, t, noise), np.float64)
  ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
  expect = np.sqrt(ab)[:, None, None, None] * x0 + np.sqrt(1 - ab)[:, None, None, None] * noise
  np.testing.assert_allclose(xt, expect, rtol=1e-5, atol=1e-6)
  # Each example's marginal: mean sqrt(ab) mu, variance ab s^2 + 1 - ab (5 standard errors).
  var = ab * sd**2 + 1 - ab
  flat = xt.reshape(4, -1)
  assert np.all(np.abs(flat.mean(1) - np.sqrt(ab) * mu) < 5 * np.sqrt(var / n))
  assert np.all(np.abs(flat.var(1) / var - 1) < 5 * np.sqrt(2 / n))


def test_q_sample_refuses_bad_timesteps_and_shapes():
  s = schedule_lib.linear(10)
  x = jnp.ones((2, 3, 3, 1))
  out = schedule_lib.q_sample(s, x, jnp.array([-1, 10]), x)
  assert np.all(np.isnan(out))  # out of range poisons, never clamps
  with pytest.raises(TypeError):
    schedule_lib.q_sample(s, x, jnp.array([1.0, 2.0]), x)
  with pytest.raises(ValueError):
    schedule_lib.q_sample(s, x, jnp.array([1, 2, 3]), x)
  with pytest.raises(ValueError):
    schedule_lib.q_sample(s, x, jnp.array([1, 2]), x[:, :2])
