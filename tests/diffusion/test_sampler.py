"""The DDIM + guidance sampler against an analytic model of Gaussian data.

For x0 ~ N(mu, s^2) elementwise the exact noise prediction is
E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t). It is affine in x_t, so
each DDIM step is affine and the whole sampler maps x_T to A x_T + mu b plus, for eta > 0, Gaussian
noise of variance V; `affine_sampler` computes A, b and V in float64 from the update formulas,
independently of the code under test. The model reads mu from the context (token 0, coordinate 0),
so the zero null context means mu = 0, and guidance with scale w is exactly the sampler for
mu_u + w (mu_c - mu_u), because the prediction is affine in mu with a slope that does not depend
on mu.

Compiling the random draws dominates the run time on CPU, so one sampler serves most tests.
"""

import collections

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from dprdm_jax.diffusion import sampler as sampler_lib
from dprdm_jax.diffusion import schedule as schedule_lib

SCHED = schedule_lib.linear()
MU, SD = 0.5, 0.3
B, D, STEPS = 2048, 8, 50
SHAPE = (B, 4, 4, 1)
N = int(np.prod(SHAPE))
TRACED_BATCHES = collections.Counter()  # batch size of each trace of SAMPLE's model


def gaussian_eps(x, t, context):
  ab = schedule_lib.alpha_bar(SCHED, t)[:, None, None, None]
  mu = context[:, 0, 0][:, None, None, None]
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * SD**2 + 1 - ab)


def counted_eps(x, t, context):
  TRACED_BATCHES[x.shape[0]] += 1  # runs once per trace, never in the compiled program
  return gaussian_eps(x, t, context)


SAMPLE = sampler_lib.make_sampler(counted_eps, SCHED, SHAPE, num_steps=STEPS)


def context(mu, b=B):
  out = np.zeros((b, 1, D), np.float32)
  out[:, 0, 0] = mu
  return out


def initial_noise(key, shape=SHAPE):
  return np.asarray(jax.random.normal(jax.random.split(key)[0], shape), np.float64)


def affine_sampler(num_steps, eta, s2=SD**2):
  """(A, b, V): DDIM with the exact eps maps x_T to A x_T + mu b + N(0, V), per element."""
  ab_all = np.cumprod(1 - np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000)**2)
  ts = sampler_lib.ddim_timesteps(1000, num_steps)
  ab = ab_all[ts]
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  a_tot, b_tot, v_tot = 1.0, 0.0, 0.0
  for a, p in zip(ab[::-1], ab_prev[::-1]):
    slope = np.sqrt(1 - a) / (a * s2 + 1 - a)  # eps = slope * (x - sqrt(a) mu)
    sigma = eta * np.sqrt((1 - p) / (1 - a) * (1 - a / p))
    direction = np.sqrt(1 - p - sigma**2)
    # x0^ = (x - sqrt(1 - a) eps) / sqrt(a);  x' = sqrt(p) x0^ + direction eps + sigma z
    gain = np.sqrt(p) * (1 - np.sqrt(1 - a) * slope) / np.sqrt(a) + direction * slope
    offset = (np.sqrt(p) * np.sqrt(1 - a) / np.sqrt(a) - direction) * slope * np.sqrt(a)
    a_tot, b_tot, v_tot = gain * a_tot, gain * b_tot + offset, gain**2 * v_tot + sigma**2
  return a_tot, b_tot, v_tot


def test_timesteps_span_zero_to_t_minus_one():
  ts = sampler_lib.ddim_timesteps(1000, 50)
  assert ts.dtype == np.int32 and ts[0] == 0 and ts[-1] == 999 and len(set(ts)) == 50
  assert set(np.diff(ts)) == {20, 21}
  np.testing.assert_array_equal(sampler_lib.ddim_timesteps(10, 10), np.arange(10))
  np.testing.assert_array_equal(sampler_lib.ddim_timesteps(1000, 1), [999])
  for bad in (0, 1001, 2.0):
    with pytest.raises(ValueError):
      sampler_lib.ddim_timesteps(1000, bad)


def test_eta0_is_the_exact_deterministic_map_and_matches_the_data():
  key = jax.random.key(0)
  x = np.asarray(SAMPLE(key, context(MU)), np.float64)
  a, b, v = affine_sampler(STEPS, 0.0)
  assert v == 0
  # The sampler is the affine map of its own x_T, to float32 rounding over 50 steps.
  np.testing.assert_allclose(x, a * initial_noise(key) + MU * b, atol=2e-5)
  # Data statistics. Exact eps, 50 steps: mean bias -0.0016 (x_T is not quite the T-1 marginal)
  # and variance 0.76 s^2 (discretisation; 1000 steps give 0.97 s^2, the last line). Tolerances:
  # mean within 0.01 of mu (6 standard errors); variance within 3% of the prediction a^2 (4 s.e.).
  assert abs(x.mean() - MU) < 0.01
  assert abs(x.var() / a**2 - 1) < 0.03
  assert 0.75 < a**2 / SD**2 < 0.77 and abs(b - 1) < 0.005
  assert 0.96 < affine_sampler(1000, 0.0)[0]**2 / SD**2 < 0.98


def test_eta1_is_stochastic_and_roughly_matches_the_data():
  key = jax.random.key(1)
  x = np.asarray(SAMPLE(key, context(MU), eta=1.0), np.float64)
  a, b, v = affine_sampler(STEPS, 1.0)
  var = a**2 + v  # x_T ~ N(0, 1)
  assert abs(x.mean() - MU * b) < 5 * np.sqrt(var / N)
  assert abs(x.var() / var - 1) < 5 * np.sqrt(2 / N)
  # Roughly the data: the mean to 0.01, the variance 0.63 s^2 with 50 steps (DDPM's posterior
  # variance ignores the uncertainty about x0) and 0.94 s^2 with 1000.
  assert abs(x.mean() - MU) < 0.01 and 0.6 < x.var() / SD**2 < 0.66
  a_long, _, v_long = affine_sampler(1000, 1.0)
  assert 0.93 < (a_long**2 + v_long) / SD**2 < 0.95
  # The key decides everything: the same key repeats the samples, another key gives others.
  np.testing.assert_array_equal(x, SAMPLE(key, context(MU), eta=1.0))
  assert not np.allclose(x, SAMPLE(jax.random.key(2), context(MU), eta=1.0))
  # A traced eta = 0 runs the stochastic program and gives the deterministic samples.
  np.testing.assert_allclose(SAMPLE(key, context(MU), eta=jnp.float32(0.0)),
                             SAMPLE(key, context(MU)), atol=1e-6)


def test_guidance_scale_one_is_the_conditional_branch_alone():
  key = jax.random.key(3)
  before = TRACED_BATCHES[2 * B]
  x = SAMPLE(key, context(MU), guidance_scale=1.0)
  assert TRACED_BATCHES[2 * B] == before  # no unconditional call was traced
  a, b, _ = affine_sampler(STEPS, 0.0)
  np.testing.assert_allclose(x, a * initial_noise(key) + MU * b, atol=2e-5)
  # A traced w = 1 takes the two-branch program: the same up to rounding.
  np.testing.assert_allclose(SAMPLE(key, context(MU), guidance_scale=jnp.float32(1.0)), x,
                             atol=1e-5)


def test_guidance_extrapolates_from_the_null_branch():
  key = jax.random.key(4)
  mu_c = np.linspace(-1.0, 1.0, B, dtype=np.float32)  # one conditional mean per example
  for w in (0.0, 3.0):
    guided = SAMPLE(key, context(mu_c), guidance_scale=w)
    # Null context = zeros = mu_u 0: the sampler for mu_u + w (mu_c - mu_u) = w mu_c.
    np.testing.assert_allclose(guided, SAMPLE(key, context(w * mu_c)), atol=1e-4)
  # w = 0 is the unconditional model, whatever the context.
  np.testing.assert_allclose(SAMPLE(key, context(mu_c), guidance_scale=0.0),
                             SAMPLE(key, context(0.0)), atol=1e-5)
  a, b, _ = affine_sampler(STEPS, 0.0)
  np.testing.assert_allclose(np.asarray(guided).mean(axis=(1, 2, 3)), 3.0 * mu_c * b,
                             atol=4 * a)  # the mean of 16 values per example: 4 sigma


def test_each_program_traces_the_model_once_and_loops_in_one_call():
  ctx = context(MU)
  for w, eta in ((1.0, 0.0), (2.0, 0.0), (2.0, 0.5)):  # warm three programs
    SAMPLE(jax.random.key(0), ctx, guidance_scale=w, eta=eta)
  seen = TRACED_BATCHES.copy()
  for i, (w, eta) in enumerate(((1.0, 0.0), (4.0, 0.0), (0.0, 1.0))):
    SAMPLE(jax.random.key(10 + i), context(0.1 * i), guidance_scale=w, eta=eta)
  assert TRACED_BATCHES == seen  # new keys, contexts, w and eta: no retrace
  # A new input signature (a given null context; no other test passes one) traces once, at 2B:
  # one batched call per step, and the 50 steps are a loop, not 50 inlined calls.
  key, mu_c = jax.random.key(6), np.linspace(-1.0, 1.0, B, dtype=np.float32)
  x = SAMPLE(key, context(mu_c), guidance_scale=3.0, null_context=context(0.2, b=1))
  assert TRACED_BATCHES - seen == collections.Counter({2 * B: 1})
  # The null context, broadcast from one token, sets mu_u = 0.2: mu = 0.2 + 3 (mu_c - 0.2).
  np.testing.assert_allclose(x, SAMPLE(key, context(0.2 + 3.0 * (mu_c - 0.2))), atol=1e-4)
  # The program is one loop over the steps (fori_loop with static bounds becomes a scan).
  jaxpr = jax.make_jaxpr(lambda key, c, w: sampler_lib.ddim_sample(
      gaussian_eps, SCHED, key, SHAPE, c, guidance_scale=w))(jax.random.key(0), ctx, 2.0)
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
  assert len(loops) == 1 and loops[0].params["length"] == STEPS


def test_sharded_batch_gives_the_same_samples():
  devices = np.array(jax.devices())
  assert len(devices) == 8, "tests/conftest.py sets up 8 fake CPU devices"
  sharding = NamedSharding(Mesh(devices, ("data",)), P("data"))
  ctx = context(np.linspace(-1.0, 1.0, B, dtype=np.float32))
  key = jax.random.key(5)
  sharded = sampler_lib.make_sampler(gaussian_eps, SCHED, SHAPE, num_steps=STEPS,
                                     sharding=sharding)
  # Guided and stochastic: the interleaved batch, x_T and the step noise all meet the sharding.
  out = sharded(key, jax.device_put(ctx, sharding), guidance_scale=2.0, eta=1.0)
  assert out.sharding.is_equivalent_to(sharding, len(SHAPE))
  np.testing.assert_allclose(out, SAMPLE(key, ctx, guidance_scale=2.0, eta=1.0), rtol=1e-6,
                             atol=1e-6)


def test_clipping_the_x0_prediction_bounds_the_samples():
  clipped = sampler_lib.make_sampler(gaussian_eps, SCHED, (4, 4, 4, 1), num_steps=5, clip_x0=0.1)
  x = np.asarray(clipped(jax.random.key(0), context(MU, b=4)))
  assert np.all(np.abs(x) <= 0.1 + 1e-6) and np.any(x == np.float32(0.1))


@pytest.mark.parametrize("kwargs", [
    dict(num_steps=0), dict(num_steps=1001), dict(eta=1.5), dict(eta=-0.1),
    dict(context=jnp.zeros((B + 1, 1, D))), dict(context=jnp.zeros((B, D))),
    dict(shape=(B, 0, 4, 1)), dict(clip_x0=0.0)])
def test_invalid_arguments_are_refused(kwargs):
  args = dict(eps_fn=gaussian_eps, schedule=SCHED, key=jax.random.key(0), shape=SHAPE,
              context=jnp.zeros((B, 1, D)))
  args.update(kwargs)
  with pytest.raises(ValueError):
    jax.eval_shape(lambda: sampler_lib.ddim_sample(**args))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_clipped_x0_prediction_comes_with_the_eps_that_reconstructs_x(eta):
  # Two steps (t = 999, then t = 0). At t = 999 the model's eps (5 everywhere) puts the x0
  # prediction far below -1, so it is clipped to -1; the step to t = 0 must use the eps that
  # (x_T, x0 = -1) imply, not the model's. At t = 0 the model says eps = 0, so the sample is
  # x_0 / sqrt(alpha-bar_0), clipped: computed here in float64 from the documented update.
  shape = (4, 4, 4, 1)

  def eps_fn(x, t, ctx):
    del ctx
    return jnp.where((t == SCHED.T - 1)[:, None, None, None], 5.0, 0.0) * jnp.ones_like(x)

  key = jax.random.key(3)
  out = sampler_lib.ddim_sample(eps_fn, SCHED, key, shape, jnp.zeros((4, 1, D)), num_steps=2,
                                eta=eta, clip_x0=1.0)
  init_key, step_key = jax.random.split(key)
  x_T = np.asarray(jax.random.normal(init_key, shape), np.float64)  # pylint: disable=invalid-name
  ab = np.asarray(SCHED.alphas_cumprod, np.float64)
  a, a0 = ab[SCHED.T - 1], ab[0]
  assert np.all((x_T - np.sqrt(1 - a) * 5.0) / np.sqrt(a) < -1)  # the clip is exercised
  eps = (x_T + np.sqrt(a)) / np.sqrt(1 - a)  # re-derived from x0 = -1
  sigma = eta * np.sqrt((1 - a0) / (1 - a) * (1 - a / a0))
  z = np.asarray(jax.random.normal(jax.random.fold_in(step_key, 0), shape), np.float64)
  x_t0 = -np.sqrt(a0) + np.sqrt(1 - a0 - sigma**2) * eps + sigma * z
  np.testing.assert_allclose(out, np.clip(x_t0 / np.sqrt(a0), -1, 1), rtol=1e-5, atol=1e-5)
