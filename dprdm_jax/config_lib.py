"""Helpers shared by the configs in configs/ (which are files, not a package, so they import this).

Configs follow big_vision: `get_config(arg)` takes one string such as "tiny" or "tiny,seed=3",
parsed by `parse_arg` into typed fields, and every field can then be overridden on the command
line with `--config.a.b=value`. A value that several parts share is set in one field and followed
by the others (`follow`, ml_collections FieldReferences), so one override moves all of them.
"""

import ast
import dataclasses

import ml_collections
from ml_collections import config_dict

from dprdm_jax import errors


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses "flag,key=value,..." into a ConfigDict typed like `defaults`.

  A bare name sets a boolean default to True. Unknown names and values of the wrong type are errors.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, text = item.partition("=")
    if name not in defaults:
      raise errors.InputError(f"unknown config argument {name!r}; known: {sorted(defaults)}")
    default = defaults[name]
    if not text:
      if not isinstance(default, bool):
        raise errors.InputError(f"config argument {name!r} needs a value")
      value = True
    elif isinstance(default, str):
      value = text
    else:
      value = ast.literal_eval(text)
      if isinstance(default, float) and isinstance(value, int):
        value = float(value)
      if type(value) is not type(default):
        raise errors.InputError(f"config argument {name}={text} is not a {type(default).__name__}")
    parsed[name] = value
  return parsed


def follow(block: ml_collections.ConfigDict, field: str) -> config_dict.FieldReference:
  """A value for another field that follows block.field: overriding block.field (on the command
  line, `--config.a.b=value`) changes it too, while overriding the follower changes the follower
  only. Strings follow with arithmetic on references (`block.get_ref("out") + "/images"`)."""
  return block.get_ref(field).identity()


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


def real_data_config(arg: ml_collections.ConfigDict, *, private: str, private_split: str,
                     privacy: ml_collections.ConfigDict,
                     evaluate: dict) -> ml_collections.ConfigDict:
  """A config of the paper's real-data setting (SPEC section 3), complete for every job.

  The public side is the paper's: ImageNet (tfds imagenet2012) at 64x64 in pixel space, the
  paper's U-Net trained on it with each image's 4 nearest public neighbours, CLIP (arg.clip, a
  local directory that `transformers.FlaxCLIPModel` reads) for both towers, retrieval by image
  embeddings in CLIP's joint space (a prompt's text embedding searches image embeddings). Its
  paths lie under runs/paper, so every private domain shares one public model. The private side
  (`private` dataset, `private_split`, the privacy block, `evaluate` settings) lies under
  runs/{private}. arg.tiny shrinks every size for tests (CLIP then has to be tiny too).

  Shared values follow one field (`follow`): the seeds follow `seed`, the U-Net's context width
  privacy.embedding_dim, the stores embed.out and the dataset names and split, the evaluation's
  epsilon and T the privacy block's.

  Used by configs/coco.py and configs/cifar10.py; `arg` holds tiny (bool), seed (int), clip (str).
  """
  from dprdm_jax.models import unet  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import index as index_lib  # pylint: disable=g-import-not-at-top
  clip = f"clip:{arg.clip}"
  public, shared, own = "imagenet2012", "runs/paper", f"runs/{private}"
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.privacy = privacy
  # Private retrieval is always exact (rule R1); these parameters serve `dprdm index build`, whose
  # fast mode is for public data and non-private baselines.
  config.retrieval = ml_collections.ConfigDict(dict(
      index=index_lib.index_config(privacy.dataset_size)))
  # tensorflow-datasets splits prepared in the ArrayRecord format under tfds_dir (README, "Real
  # data"); "" is tensorflow-datasets' default (TFDS_DATA_DIR, else ~/tensorflow_datasets).
  config.data = ml_collections.ConfigDict(dict(
      resolution=64, public=public, private=private, private_split=private_split, tfds_dir="",
      public_test_split="validation"))
  # `dprdm embed --dataset D --split S` writes OUT/D-S/{images,captions}, public and private.
  config.embed = ml_collections.ConfigDict(dict(
      out=f"{shared}/embeddings", batch_size=256, chunk_size=8192, key="image", image_tower=clip,
      text_tower=clip))
  emb = config.embed.get_ref("out")
  public_dir = emb + "/" + config.data.get_ref("public") + "-train"
  private_dir = (emb + "/" + config.data.get_ref("private") + "-"
                 + config.data.get_ref("private_split"))
  # The paper's U-Net (about 400M parameters), its schedule, "Adapt" training with conditioning
  # dropout, AdamW at 1e-4 with a global batch of 1,280. The step count is a budget of ours (the
  # paper's is not in SPEC): 100,000 steps, 128M examples, about 100 epochs of ImageNet.
  config.model = model_config(unet.PAPER_CONFIG)
  config.model.context_dim = follow(config.privacy, "embedding_dim")
  config.diffusion = diffusion_config(eta=0.0, guidance_scale=2.0)
  config.train = ml_collections.ConfigDict(dict(
      workdir=f"{shared}/unet", embeddings=public_dir + "/images",
      num_neighbors=4, batch_size=1280, steps=100_000, learning_rate=1e-4, warmup_steps=5000,
      grad_clip=1.0, weight_decay=0.0, ema_decay=0.9999, seed=follow(config, "seed"),
      log_every=100, checkpoint_every=2000, keep_checkpoints=3))
  # retrieval: "device" (the table sharded over the mesh) or "host" (a set larger than device
  # memory, searched in place by the host's compiled scan; dprdm_jax/generate.py).
  config.generate = ml_collections.ConfigDict(dict(
      out=f"{own}/generate", ledger=f"{own}/ledger.db", batch_size=256, retrieval="device",
      checkpoint="", private_keys=private_dir + "/captions", private_values=private_dir + "/images",
      public_keys=public_dir + "/captions", public_values=public_dir + "/images"))
  # `dprdm evaluate`, judged by the same CLIP (evaluate/judges.py): FD, KID and prdc on CLIP
  # image features against a held-out split of the private dataset, and the CLIP score.
  config.evaluate = ml_collections.ConfigDict(dict(
      features=clip, out=f"{own}/report", ledger=f"{own}/eval-ledger.db", ledger_budget=1000.0,
      ledger_accountant="rdp", epsilon=follow(config.privacy, "epsilon_budget"),
      num_queries=follow(config.privacy, "num_queries"),
      interpolations=(1.0, 0.7), guidance_scales=(1.5, 2.0, 3.0),
      epsilons=(1.0, 2.0, 5.0, 10.0, 20.0), nearest_k=5, bootstrap_rounds=50, kid_subsets=50,
      **evaluate))
  # Data parallel over every device; --config.mesh.fsdp=N shards parameters, gradients and
  # optimizer state over N devices of a host (ZeRO-3) when the replicas do not fit.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_rules = LOGICAL_RULES
  if arg.tiny:
    config.privacy.update(dataset_size=24, num_queries=10)
    config.data.resolution = 16
    config.embed.update(batch_size=8, chunk_size=16)
    config.model.update(resolution=16, base_channels=16, channel_mult=(1, 2),
                        attention_resolutions=(8,), head_channels=16, norm_groups=4,
                        num_res_blocks=1)
    config.diffusion.sample_steps = 3
    config.train.update(batch_size=8, steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    config.generate.batch_size = 8
    config.evaluate.update(neighbors=(2,), sampling_rates=(0.5,), interpolations=(1.0,),
                           guidance_scales=(2.0,), epsilons=(10.0,), query_counts=(10,),
                           sweep_per_prompt=1, final_per_prompt=2, nearest_k=2,
                           bootstrap_rounds=3, kid_subsets=3, reference_size=8)
  return config
