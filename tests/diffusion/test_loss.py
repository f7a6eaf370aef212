"""The epsilon-prediction loss (by hand, and minimised by the optimal predictor) and the EMA."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dprdm_jax.diffusion import loss as loss_lib
from dprdm_jax.diffusion import schedule as schedule_lib

SCHED = schedule_lib.linear()
MU, SD = 0.5, 0.3


def gaussian_eps(scale=1.0, mu=MU):
  """E[eps | x_t] for x0 ~ N(mu, SD^2) elementwise, optionally scaled (a perturbed predictor)."""

  def eps_fn(x, t, context):
    del context
    ab = schedule_lib.alpha_bar(SCHED, t)[:, None, None, None]
    return scale * jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * SD**2 + 1 - ab)

  return eps_fn


def test_loss_matches_a_hand_computation_with_the_documented_key_split():
  b, d = 8, 5
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (b, 6, 6, 3)).astype(np.float32)
  context = rng.normal(size=(b, 1, d)).astype(np.float32)

  def eps_fn(x, t, c):  # uses every input, so a wrong t or context changes the loss
    return 0.5 * x + (t / 1000.0)[:, None, None, None] * c.mean(axis=(1, 2))[:, None, None, None]

  @jax.jit
  def loss_and_draws(key):  # one program: the loss and the draws the docstring promises
    t_key, noise_key = jax.random.split(key)
    return (loss_lib.diffusion_loss(eps_fn, SCHED, x0, context, key),
            jax.random.randint(t_key, (b,), 0, 1000, jnp.int32),
            jax.random.normal(noise_key, x0.shape, jnp.float32))

  got, t, noise = loss_and_draws(jax.random.key(3))
  t, noise = np.asarray(t), np.asarray(noise, np.float64)
  ab = np.asarray(SCHED.alphas_cumprod, np.float64)[t][:, None, None, None]
  xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  pred = 0.5 * xt + (t / 1000.0)[:, None, None, None] * context.mean(axis=(1, 2))[:, None, None,
                                                                                  None]
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.mean((pred - noise)**2), rtol=1e-5)
  assert len(np.unique(t)) == b  # timesteps drawn per example


def test_optimal_predictor_has_the_lowest_loss():
  b = 4096
  x0 = (MU + SD * np.random.default_rng(0).normal(size=(b, 4, 4, 1))).astype(np.float32)
  context = jnp.zeros((b, 1, 4))
  predictors = {"optimal": gaussian_eps(), "x1.1": gaussian_eps(scale=1.1),
                "x0.9": gaussian_eps(scale=0.9), "mu+0.1": gaussian_eps(mu=0.6)}
  # The same key for every predictor: the same t and noise, a paired comparison.
  losses = jax.jit(lambda key: {name: loss_lib.diffusion_loss(fn, SCHED, x0, context, key)
                                for name, fn in predictors.items()})(jax.random.key(1))
  losses = {k: float(v) for k, v in losses.items()}
  assert all(losses["optimal"] < v for k, v in losses.items() if k != "optimal"), losses
  # Its expected value is the posterior variance of eps averaged over t:
  # E_t[ab s^2 / (ab s^2 + 1 - ab)] (0.63 for this schedule and s); 0.01 is ~2 standard errors.
  ab = np.asarray(SCHED.alphas_cumprod, np.float64)
  expected = np.mean(ab * SD**2 / (ab * SD**2 + 1 - ab))
  assert abs(losses["optimal"] - expected) < 0.01, (losses["optimal"], expected)


def test_loss_is_differentiable_under_jit_and_checks_shapes():
  x0 = jnp.ones((4, 2, 2, 1))
  context = jnp.zeros((4, 1, 3))

  @jax.jit
  def grad(w):
    return jax.grad(lambda w: loss_lib.diffusion_loss(lambda x, t, c: w * x, SCHED, x0, context,
                                                      jax.random.key(0)))(w)

  assert np.isfinite(grad(0.3))
  # Shape errors are raised while tracing, before any random draw.
  with pytest.raises(ValueError):
    jax.eval_shape(lambda: loss_lib.diffusion_loss(lambda x, t, c: x[:, :1], SCHED, x0, context,
                                                   jax.random.key(0)))
  with pytest.raises(ValueError):
    loss_lib.diffusion_loss(lambda x, t, c: x, SCHED, x0, context[:2], jax.random.key(0))


def test_ema_update():
  ema = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
  new = {"w": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(-4.0)}}
  out = loss_lib.ema_update(ema, new, 0.75)
  np.testing.assert_allclose(out["w"], [1.5, 1.5])
  np.testing.assert_allclose(out["b"]["c"], 2.0)
  np.testing.assert_array_equal(loss_lib.ema_update(ema, new, 1.0)["w"], ema["w"])
  np.testing.assert_array_equal(loss_lib.ema_update(ema, new, 0.0)["w"], new["w"])
  traced = jax.jit(loss_lib.ema_update)(ema, new, jnp.float32(0.75))
  np.testing.assert_allclose(traced["w"], [1.5, 1.5])
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError):
      loss_lib.ema_update(ema, new, bad)


def test_ema_decay_warms_up_like_ldm_then_stays_at_its_maximum():
  steps = np.array([0, 1, 8, 89, 989, 20_000])
  got = np.asarray(jax.jit(loss_lib.ema_decay, static_argnums=1)(steps, 0.999))
  n = steps + 1
  np.testing.assert_allclose(got, np.minimum(0.999, (1 + n) / (10 + n)), rtol=1e-6)
  np.testing.assert_allclose(got[:4], [2 / 11, 3 / 12, 10 / 19, 0.91], rtol=1e-6)
  assert got[-1] == np.float32(0.999) and np.all(np.diff(got) >= 0)
  # After 200 updates from zeros towards ones the warmed-up average is within 5% of the target;
  # with the constant decay it would still be at 18%.
  ema = jnp.zeros(())
  for step in range(200):
    ema = loss_lib.ema_update(ema, jnp.ones(()), loss_lib.ema_decay(step, 0.999))
  assert 0.95 < float(ema) <= 1.0 and 1 - 0.999**200 < 0.19
  with pytest.raises(ValueError):
    loss_lib.ema_decay(0, 1.5)


def test_ema_update_on_nnx_state():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  ema = jax.tree.map(jnp.zeros_like, params)
  out = loss_lib.ema_update(ema, params, 0.9)
  assert isinstance(out, nnx.State)
  np.testing.assert_allclose(out["kernel"][...], 0.1 * params["kernel"][...], rtol=1e-6)
