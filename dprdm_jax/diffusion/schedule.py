"""Noise schedules of the discrete-time diffusion process and the forward (noising) sample.

Convention (DDPM, Ho et al. 2020): timesteps t = 0, ..., T-1 index the T forward steps, beta_t is
the variance added at step t, and alphas_cumprod[t] = prod_{s <= t} (1 - beta_s), often written
alpha-bar_t. The forward marginal is

    x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps,   eps ~ N(0, I),

so t = 0 is already slightly noisy and t = T-1 is almost pure noise. The schedules are computed in
float64 with numpy, once, and stored as float32 jax arrays: a float32 cumulative product over 1000
steps would drift in its last digits, and the sampler's x_T ~ N(0, I) assumes alphas_cumprod[T-1]
is what the schedule says.

`Schedule` is a pytree (its arrays are leaves), so it can be passed into jitted functions; T is the
static length of its arrays.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """A diffusion noise schedule: betas (T,) and alphas_cumprod (T,), both float32."""
  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def T(self) -> int:  # pylint: disable=invalid-name
    """The number of diffusion steps, T as in the papers (static: the arrays' length)."""
    return self.betas.shape[0]


def from_betas(betas: np.ndarray) -> Schedule:
  """The schedule of a float64 array of betas, each in (0, 1); alphas_cumprod in float64 first."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise errors.InputError(f"betas must be a non-empty vector, got shape {betas.shape}")
  if not np.all((betas > 0) & (betas < 1)):
    raise errors.InputError("every beta must lie in (0, 1)")
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def _check_steps(T: int) -> None:  # pylint: disable=invalid-name
  if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
    raise errors.InputError(f"T must be a positive integer, got {T!r}")


def linear(T: int = 1000, beta_start: float = 0.0015,  # pylint: disable=invalid-name
           beta_end: float = 0.0195) -> Schedule:
  """The LDM "linear" schedule: betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.

  The defaults are the paper's (SPEC section 3): beta_0 = 0.0015, beta_{T-1} = 0.0195, T = 1000,
  which leaves alphas_cumprod[T-1] ~ 1.4e-4.
  """
  _check_steps(T)
  if not 0 < beta_start <= beta_end < 1:
    raise errors.InputError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  return from_betas(np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T, dtype=np.float64)**2)


def cosine(T: int = 1000, s: float = 0.008) -> Schedule:  # pylint: disable=invalid-name
  """The cosine schedule of Nichol & Dhariwal (2021), betas clipped at 0.999.

  f(u) = cos((u / T + s) / (1 + s) * pi / 2) ** 2 and beta_t = min(1 - f(t + 1) / f(t), 0.999),
  so alphas_cumprod[t] = f(t + 1) / f(0) until the clip, which only bites at the last steps (the
  unclipped last beta is 1, which would make x_{T-1} carry no signal and its alpha-bar exactly 0).
  The small offset s keeps beta_0 from being vanishingly small.
  """
  _check_steps(T)
  if not s > 0:
    raise errors.InputError(f"s must be positive, got {s}")
  f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * np.pi / 2)**2
  return from_betas(np.minimum(1.0 - f[1:] / f[:-1], 0.999))


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
  """Reshapes per-example values (B,) to (B, 1, ..., 1) so they broadcast over an ndim array."""
  return values.reshape(values.shape + (1,) * (ndim - 1))


def alpha_bar(schedule: Schedule, t: jax.Array) -> jax.Array:
  """alphas_cumprod[t] for integer timesteps t; a t outside [0, T) gives NaN, never a clamp.

  Indices cannot be checked for range under jit, so an out-of-range timestep poisons the result
  (and hence the loss or the sample) rather than silently reading the first or last step.
  """
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise errors.WrongTypeError(f"timesteps must be integers, got dtype {t.dtype}")
  # jnp.take would wrap negative indices NumPy-style, so the range is checked explicitly.
  inside = (t >= 0) & (t < schedule.T)
  return jnp.where(inside, jnp.take(schedule.alphas_cumprod, t, mode="clip"), jnp.nan)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise, per example.

  Args:
    schedule: the noise schedule.
    x0: clean data (B, ...), float.
    t: integer timesteps (B,) in [0, T); out of range gives NaN (see `alpha_bar`).
    noise: the standard normal noise, the same shape as x0.

  Returns:
    x_t, the same shape as x0, float32.
  """
  x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  if x0.shape != noise.shape:
    raise errors.InputError(f"x0 {x0.shape} and noise {noise.shape} must have the same shape")
  if x0.ndim < 1 or jnp.shape(t) != x0.shape[:1]:
    raise errors.InputError(f"t must have shape (B,) = {x0.shape[:1]}, got {jnp.shape(t)}")
  ab = _per_example(alpha_bar(schedule, t), x0.ndim)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise
