"""Helpers shared by the configs in configs/ (which are files, not a package, so they import this).

Configs follow big_vision: `get_config(arg)` takes one string such as "tiny" or "tiny,seed=3",
parsed by `parse_arg` into typed fields, and every field can then be overridden on the command
line with `--config.a.b=value`.
"""

import ast
import dataclasses

import ml_collections
from ml_collections import config_dict


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses "flag,key=value,..." into a ConfigDict typed like `defaults`.

  A bare name sets a boolean default to True. Unknown names and values of the wrong type are errors.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, text = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
    default = defaults[name]
    if not text:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {name!r} needs a value")
      value = True
    elif isinstance(default, str):
      value = text
    else:
      value = ast.literal_eval(text)
      if isinstance(default, float) and isinstance(value, int):
        value = float(value)
      if type(value) is not type(default):
        raise ValueError(f"config argument {name}={text} is not a {type(default).__name__}")
    parsed[name] = value
  return parsed


def load(path: str, *overrides: str) -> ml_collections.ConfigDict:
  """A config file ("FILE" or "FILE:ARG") with "--config.a.b=value" overrides, as on the command
  line; for notebooks and scripts."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  argv = ["config_lib", f"--config={path}", *overrides]
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def privacy_config(*, dataset_size: int, embedding_dim: int, sampling_rate: float,
                   num_neighbors: int, noise_std: float, interpolation: float,
                   epsilon_budget: float, num_queries: int,
                   accountant: str = "pld") -> ml_collections.ConfigDict:
  """The privacy block of a config (SPEC section 2 notation in the comments).

  delta is a placeholder: unset means 1/N, the paper's choice, with N = dataset_size.
  """
  return ml_collections.ConfigDict(dict(
      dataset_size=dataset_size,  # N, records in the private retrieval set
      embedding_dim=embedding_dim,  # d
      sampling_rate=sampling_rate,  # q, Poisson subsampling probability per query
      num_neighbors=num_neighbors,  # k
      noise_std=noise_std,  # sigma, std of the Gaussian noise added to the mean of k neighbours
      interpolation=interpolation,  # lambda, weight of the private part of the context
      delta=config_dict.placeholder(float),  # None: 1/N
      epsilon_budget=epsilon_budget,  # epsilon_max of the dataset's budget ledger
      num_queries=num_queries,  # T, the queries the budget is planned for
      accountant=accountant,  # "pld" (tighter) or "rdp"; both are reported
  ))



# Where each logical parameter axis (models/unet.py, LOGICAL_AXES) goes on the mesh
# (sharding.py). Feature channels split over fsdp (parameters, gradients and optimizer state
# sharded, ZeRO-3 style); attention heads and MLP width over tensor. A mesh axis of size 1
# leaves its dimensions whole, so one table serves one CPU and a pod.
LOGICAL_RULES = (
    ("channels", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("channels_in", None),
    ("embed", None),
    ("context", None),
    ("conv_height", None),
    ("conv_width", None),
    ("norm", None),
)


def model_config(unet_config) -> ml_collections.ConfigDict:
  """The model block: the fields of a models.unet.UNetConfig, each overridable."""
  return ml_collections.ConfigDict(dataclasses.asdict(unet_config))


def diffusion_config(**overrides) -> ml_collections.ConfigDict:
  """The diffusion block: the paper's schedule and "Adapt" conditioning (SPEC section 3)."""
  config = ml_collections.ConfigDict(dict(
      schedule="linear",  # LDM's: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2
      timesteps=1000, beta_start=0.0015, beta_end=0.0195,
      sigma_max=0.05,  # training context noise s ~ U(0, sigma_max]
      p_uncond=0.1,  # conditioning dropout: trains the unconditional branch for guidance
      sample_steps=50, eta=0.0, guidance_scale=2.0,
      # Sampling clips each x0 prediction to [-clip_x0, clip_x0]: pixel-space models (data in
      # [-1, 1]) need it, as an eps error at t = T-1 reaches x0 multiplied by 1/sqrt(alpha-bar)
      # = 84; set None for an unbounded latent space (diffusion/sampler.py).
      clip_x0=1.0))
  config.update(overrides)
  return config
