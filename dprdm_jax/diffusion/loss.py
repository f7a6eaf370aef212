"""The training objective (epsilon-prediction L2 loss) and the EMA of the weights used for sampling.

SPEC section 3: epsilon-prediction, L2 loss, EMA weights for sampling. The model is any function
`eps_fn(x_t, t, context) -> eps` with x_t (B, H, W, C) float32, t (B,) int32 in [0, T) and context
(B, L, d) float32; the loss is the "simple" DDPM objective of Ho et al. (2020),

    L = mean over all elements of (eps_fn(x_t, t, context) - eps) ** 2,
    t ~ U{0, ..., T-1} per example,  eps ~ N(0, I),  x_t = q_sample(x0, t, eps),

an unweighted mean over batch, pixels and channels, so its scale does not depend on the image size.
"""

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dprdm_jax import errors
from dprdm_jax.diffusion import schedule as schedule_lib

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def diffusion_loss(eps_fn: EpsFn, schedule: schedule_lib.Schedule, x0: jax.Array,
                   context: jax.Array, key: jax.Array) -> jax.Array:
  """The epsilon-prediction L2 loss of one batch: a float32 scalar.

  Randomness: `t_key, noise_key = jax.random.split(key)`; the timesteps are
  `jax.random.randint(t_key, (B,), 0, T, int32)` and the noise is
  `jax.random.normal(noise_key, x0.shape, float32)`. Pass a fresh key per step (e.g. fold the step
  number into a run key); the draws do not depend on how the batch is sharded.

  Args:
    eps_fn: the model, (x_t, t, context) -> predicted noise of x_t's shape.
    schedule: the noise schedule.
    x0: clean training images (B, H, W, C).
    context: the cross-attention context (B, L, d), e.g. from `conditioning.adapt_context`.
    key: a PRNG key.

  Returns:
    The mean squared error over all elements of the batch.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  if context.ndim != 3 or context.shape[0] != x0.shape[0]:
    raise errors.InputError(f"context must be (B, L, d) with B = {x0.shape[0]}, got "
                            f"{context.shape}")
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.T, jnp.int32)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  pred = eps_fn(schedule_lib.q_sample(schedule, x0, t, noise), t, context)
  if pred.shape != x0.shape:
    raise errors.InputError(f"eps_fn returned shape {pred.shape}, expected {x0.shape}")
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))


def ema_update(ema_params, params, decay):
  """One step of the exponential moving average: decay * ema_params + (1 - decay) * params.

  This is `optax.incremental_update(params, ema_params, step_size=1 - decay)` (Polyak averaging);
  optax has no separate EMA-of-parameters helper (`optax.ema` averages gradient updates inside an
  optimiser chain), so this wrapper only fixes the argument order and checks the decay. Works on
  any pytree of float arrays, e.g. an `nnx.State` from `nnx.state(model, nnx.Param)`; the result
  has ema_params' structure. decay may be a traced value (e.g. a warm-up ramp); a Python number is
  checked to lie in [0, 1]: decay = 1 freezes the average, decay = 0 copies params.
  """
  if isinstance(decay, numbers.Real) and not 0 <= decay <= 1:
    raise errors.InputError(f"decay must lie in [0, 1], got {decay}")
  return optax.incremental_update(params, ema_params, 1.0 - decay)


def ema_decay(step, max_decay: float):
  """The EMA decay of update number step + 1 (step = updates done before it), with LDM's warm-up.

  decay = min(max_decay, (1 + n) / (10 + n)), n = step + 1, as latent diffusion's LitEma: the
  first updates nearly copy the parameters (n = 1: 2/11), so the average forgets the random
  initialisation (whose output layer is zero) within a few hundred steps instead of the
  ~3/(1 - max_decay) steps a constant decay needs; it reaches max_decay = 0.999 at n = 8,991.
  step may be traced.
  """
  if not 0 <= max_decay <= 1:
    raise errors.InputError(f"max_decay must lie in [0, 1], got {max_decay}")
  n = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.minimum(jnp.float32(max_decay), (1.0 + n) / (10.0 + n))
