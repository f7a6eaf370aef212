"""DDIM sampling (Song et al. 2021) with classifier-free guidance, compiled as one loop.

Timesteps ("linspace" spacing): with n = num_steps, the model is evaluated at the n integers
closest to an even grid over [0, T-1],

    tau_i = round(i * (T - 1) / (n - 1)),   i = n-1, ..., 0     (T = 1000, n = 50: 999, ..., 20, 0)

so the first step starts at T-1, the step whose marginal the initial x_T ~ N(0, I) approximates
(alphas_cumprod[T-1] ~ 1.4e-4 for the paper's schedule), and the last model call is at t = 0, the
least noisy step, from which the final update goes to alpha-bar = 1, i.e. returns the x0
prediction (the DDIM paper's alpha_0 = 1). The alternatives leave a gap at one end: LDM's
"uniform" grid (1, 21, ..., 981) never starts from t = T-1 and stops at alpha-bar_0 with the
residual noise still in the sample; the "trailing" grid (999, ..., 19) makes its last jump to
clean data from t = 19, where the x0 prediction is a visibly blurred posterior mean.

One step from tau_i (alpha-bar a) to tau_{i-1} (alpha-bar a_prev; 1 after the last step):

    x0^   = (x - sqrt(1 - a) * eps) / sqrt(a)
    sigma = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x     = sqrt(a_prev) * x0^ + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,   z ~ N(0, I)

With clip_x0, x0^ is clipped to [-clip_x0, clip_x0] and eps re-derived from it,
eps = (x - sqrt(a) * x0^) / sqrt(1 - a), so that the pair still reconstructs x exactly.

eta = 0 is the deterministic DDIM; eta = 1 is DDPM's ancestral sampler on the strided steps. Even
with the exact eps, few steps shrink narrow distributions: for x0 ~ N(0.5, 0.3^2) and the paper's
schedule, 50 steps give a sample variance of 0.76 s^2 (eta = 0) or 0.63 s^2 (eta = 1), and 1000
steps 0.97 s^2 (the tests check these numbers); the error sits in the last, least noisy steps.

Guidance: eps = eps_u + w * (eps_c - eps_u), eps_c with the context and eps_u with the null context
(zeros by default, the unconditional branch that conditioning dropout trains); w = 1 is purely
conditional and w = 0 purely unconditional. Both branches come from ONE model call on a batch of
2B that interleaves the conditional and the unconditional copy of each example
([x_0, x_0, x_1, x_1, ...], contexts [c_0, null_0, c_1, null_1, ...]): when the batch is sharded
over devices, each device's slice of the interleaved batch is built from its own slice of x, so no
example moves between devices, whereas concatenating [x; x] would. With w = 1 given as a Python
number the unconditional branch is skipped altogether.

The x0 prediction is not clipped by default: the range of x0 belongs to the data (pixels in
[-1, 1], or an unbounded latent), clipping is not part of the DDIM update and biases the sampled
distribution whenever the prediction leaves the range, e.g. under strong guidance. Pixel-space
models need clip_x0=1.0 in practice (the configs' diffusion.clip_x0): at t = T-1 an eps error
reaches x0 multiplied by 1/sqrt(alpha-bar) = 84, and a model short of training then drives the
sample far outside the data's range, where it was never trained to denoise.

Randomness: `init_key, step_key = jax.random.split(key)`; x_T = normal(init_key, shape) and the
noise of step number s (s = 0 for the first, noisiest step) is normal(fold_in(step_key, s), shape),
drawn only when eta is not the constant 0.
With threefry's partitionable mode (jax's default) the draws do not depend on the sharding.
"""

import functools
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors
from dprdm_jax.diffusion import schedule as schedule_lib

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def ddim_timesteps(T: int, num_steps: int) -> np.ndarray:  # pylint: disable=invalid-name
  """The model's timesteps, ascending and distinct: round(i * (T - 1) / (num_steps - 1)), int32.

  Rounds half up in integer arithmetic, so the grid is exact for any T; num_steps = 1 gives [T-1].
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise errors.InputError(f"num_steps must be an integer, got {num_steps!r}")
  if not 1 <= num_steps <= T:
    raise errors.InputError(f"num_steps must lie in [1, T = {T}], got {num_steps}")
  if num_steps == 1:
    return np.array([T - 1], np.int32)
  i = np.arange(num_steps, dtype=np.int64)
  return ((2 * i * (T - 1) + num_steps - 1) // (2 * (num_steps - 1))).astype(np.int32)


def _is_one(guidance_scale) -> bool:
  """Whether guidance_scale is the concrete number 1 (then the unconditional call is skipped)."""
  return isinstance(guidance_scale, numbers.Real) and guidance_scale == 1


def _is_zero(eta) -> bool:
  """Whether eta is the concrete number 0 (then no step noise is drawn)."""
  return isinstance(eta, numbers.Real) and eta == 0


def _check_eta(eta) -> None:
  """Checks eta when it is a Python number (traced values cannot be); above 1, sigma > the step."""
  if isinstance(eta, numbers.Real) and not 0 <= eta <= 1:
    raise errors.InputError(f"eta must lie in [0, 1], got {eta}")


def _check_clip(clip_x0) -> None:
  if clip_x0 is not None and not (isinstance(clip_x0, numbers.Real) and clip_x0 > 0):
    raise errors.InputError(f"clip_x0 must be None or a number > 0, got {clip_x0!r}")


def check_settings(T: int, num_steps: int, eta, clip_x0) -> None:  # pylint: disable=invalid-name
  """InputError for DDIM settings `ddim_sample` would refuse: for a caller to check them before
  it spends anything (`generate` charges the budget first, then samples)."""
  ddim_timesteps(T, num_steps)
  _check_eta(eta)
  _check_clip(clip_x0)


def _check_shape(shape, context_shape=None) -> tuple[int, ...]:
  shape = tuple(shape)
  if len(shape) < 1 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
    raise errors.InputError(f"shape must be a tuple of positive integers (B, ...), got {shape}")
  if context_shape is not None and (len(context_shape) != 3 or context_shape[0] != shape[0]):
    raise errors.InputError(f"context must be (B, L, d) with B = {shape[0]}, got {context_shape}")
  return shape


def _guided_eps(eps_fn, x, t, context, null, guidance_scale):
  """eps_u + w (eps_c - eps_u) from one model call on the interleaved 2B batch (see the top)."""
  b = x.shape[0]

  def interleave(first, second):
    return jnp.stack([first, second], axis=1).reshape((2 * b,) + first.shape[1:])

  out = eps_fn(interleave(x, x), interleave(t, t), interleave(context, null))
  out = out.astype(jnp.float32).reshape((b, 2) + x.shape[1:])
  eps_c, eps_u = out[:, 0], out[:, 1]
  return eps_u + guidance_scale * (eps_c - eps_u)


def ddim_sample(eps_fn: EpsFn, schedule: schedule_lib.Schedule, key: jax.Array,
                shape: tuple[int, ...], context: jax.Array, *, num_steps: int = 50,
                eta=0.0, guidance_scale=1.0, null_context: Optional[jax.Array] = None,
                clip_x0: Optional[float] = None,
                sharding: Optional[jax.sharding.Sharding] = None) -> jax.Array:
  """Draws a batch of samples x0 of the given shape by DDIM with classifier-free guidance.

  Traceable: call it inside `jax.jit` (or use `make_sampler`), where the num_steps steps run as one
  `lax.fori_loop`, so sampling is one dispatch and the model is traced once. shape, num_steps,
  clip_x0 and sharding are static; key, context, null_context, eta and guidance_scale may be
  traced. guidance_scale given as the Python number 1 skips the unconditional branch and eta given
  as the Python number 0 skips the step-noise draws; traced values always take the general path
  (the same result up to rounding).

  Args:
    eps_fn: the model, (x_t (N, ...), t (N,) int32, context (N, L, d)) -> eps (N, ...).
    schedule: the noise schedule the model was trained with.
    key: a PRNG key (see the module docstring for how it is split).
    shape: (B, H, W, C), the shape of the samples.
    context: (B, L, d) cross-attention context, e.g. (B, 1, d) from the aggregation kernel.
    num_steps: the number of model evaluations (of each branch), in [1, T].
    eta: DDIM stochasticity in [0, 1]; 0 is deterministic given the key's x_T.
    guidance_scale: w; 1 is the conditional model alone.
    null_context: the unconditional context, broadcastable to context's shape; None means zeros.
      Unused when guidance_scale is the constant 1.
    clip_x0: if set, a bound > 0: x0 predictions are clipped to [-clip_x0, clip_x0] (off by
      default, see the module docstring).
    sharding: if set, the sharding of x_t, e.g. NamedSharding(mesh, P('data')); None lets the
      compiler propagate it from the context.

  Returns:
    The samples (B, H, W, C), float32.
  """
  shape = _check_shape(shape, jnp.shape(context))
  ts_np = ddim_timesteps(schedule.T, num_steps)
  _check_eta(eta)
  _check_clip(clip_x0)
  context = jnp.asarray(context, jnp.float32)
  guided, stochastic = not _is_one(guidance_scale), not _is_zero(eta)
  null = None
  if guided:
    null = jnp.zeros_like(context) if null_context is None else null_context
    null = jnp.broadcast_to(jnp.asarray(null, jnp.float32), context.shape)

  ts = jnp.asarray(ts_np)
  ab = schedule.alphas_cumprod[ts]
  ab_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), ab[:-1]])
  init_key, step_key = jax.random.split(key)

  def constrain(x):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

  def step(s, x):
    i = num_steps - 1 - s  # s counts steps taken; i indexes the ascending timesteps
    a, a_prev = ab[i], ab_prev[i]
    t = jnp.full(shape[:1], ts[i], jnp.int32)
    if guided:
      eps = _guided_eps(eps_fn, x, t, context, null, guidance_scale)
    else:
      eps = eps_fn(x, t, context).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      # (x0, eps) must still reconstruct x: keeping the model's eps beside a clipped x0 pushes
      # every clipped pixel the wrong way at the next step (GLIDE and DDPM re-derive it too).
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    x = jnp.sqrt(a_prev) * x0
    if not stochastic:
      return constrain(x + jnp.sqrt(1.0 - a_prev) * eps)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    # 1 - a_prev - sigma^2 >= 0 for eta <= 1; the maximum only absorbs float32 rounding.
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
    z = jax.random.normal(jax.random.fold_in(step_key, s), shape, jnp.float32)
    return constrain(x + direction + sigma * z)

  x_T = constrain(jax.random.normal(init_key, shape, jnp.float32))  # pylint: disable=invalid-name
  return jax.lax.fori_loop(0, num_steps, step, x_T)


def make_sampler(eps_fn: EpsFn, schedule: schedule_lib.Schedule, shape: tuple[int, ...], *,
                 num_steps: int = 50, clip_x0: Optional[float] = None,
                 sharding: Optional[jax.sharding.Sharding] = None) -> Callable[..., jax.Array]:
  """A compiled sampler: `sample(key, context, *, guidance_scale=1.0, eta=0.0, null_context=None)`.

  Each call is one jitted dispatch of `ddim_sample`. guidance_scale and eta are traced, so new
  values do not recompile. Up to four programs are compiled, each once, on first use: with or
  without the unconditional branch (guidance_scale given as the Python number 1 or not) and with or
  without step noise (eta given as the Python number 0 or not). eps_fn and schedule are closed
  over: arrays they hold become constants of the program, which suits analytic models and frozen
  weights; to pass model weights as arguments, call `ddim_sample` inside your own jitted function
  of the weights instead.
  """
  shape = _check_shape(shape)
  ddim_timesteps(schedule.T, num_steps)
  _check_clip(clip_x0)

  @functools.cache
  def program(guided: bool, stochastic: bool):
    def run(key, context, null_context, guidance_scale, eta):
      return ddim_sample(eps_fn, schedule, key, shape, context, num_steps=num_steps,
                         eta=eta if stochastic else 0.0,
                         guidance_scale=guidance_scale if guided else 1.0,
                         null_context=null_context, clip_x0=clip_x0, sharding=sharding)
    return jax.jit(run)

  def sample(key: jax.Array, context: jax.Array, *, guidance_scale=1.0, eta=0.0,
             null_context: Optional[jax.Array] = None) -> jax.Array:
    _check_eta(eta)
    guided, stochastic = not _is_one(guidance_scale), not _is_zero(eta)
    # As float32 arrays, a Python float and a jnp scalar give the same signature: no retrace.
    return program(guided, stochastic)(key, context, null_context if guided else None,
                                       jnp.asarray(guidance_scale if guided else 1.0, jnp.float32),
                                       jnp.asarray(eta if stochastic else 0.0, jnp.float32))

  return sample
