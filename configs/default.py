"""The offline default: private Fashion-MNIST retrieval, MiniLM (384-d) embeddings.

Everything it needs installs as packages (README, "The embedded default"). Variants:

  dprdm privacy plan --config configs/default.py        # the budget of the default settings
  --config configs/default.py:tiny                       # tiny sizes for tests (seconds)

Privacy settings: k = 16 neighbours of a 5% Poisson subsample (about 3,000 records per query),
sigma = 0.14 (noise multiplier z = k*sigma/2 = 1.12); 1,000 queries then cost epsilon = 8.66 (PLD;
RDP 9.46) at delta = 1/60,000, inside the budget of 10.
"""

import ml_collections

from dprdm_jax import config_lib
from dprdm_jax.models import unet
from dprdm_jax.retrieval import index as index_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, seed=0)
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.privacy = config_lib.privacy_config(
      dataset_size=60_000, embedding_dim=384, sampling_rate=0.05, num_neighbors=16, noise_std=0.14,
      interpolation=1.0, epsilon_budget=10.0, num_queries=1_000)
  if arg.tiny:
    config.privacy.dataset_size = 1_000
    config.privacy.embedding_dim = 16
    config.privacy.num_queries = 10
  # Private retrieval is always exact (rule R1); these parameters serve `dprdm index build`, whose
  # fast mode is for public data and non-private baselines.
  config.retrieval = ml_collections.ConfigDict(dict(
      index=index_lib.index_config(config.privacy.dataset_size)))

  # Offline data (dprdm_jax/data/offline.py): 28x28 images padded to 32x32, one channel.
  config.data = ml_collections.ConfigDict(dict(
      resolution=32, public="public", private="fashion_mnist", tfds_dir=""))

  # The image tower, trained on the public set by `dprdm train-encoder` (about 4 minutes on two
  # CPU cores): LiT-style alignment to the frozen MiniLM caption embeddings.
  config.encoder = ml_collections.ConfigDict(dict(
      workdir="runs/default/encoder", width=512, depth=2, steps=600, batch_size=128,
      learning_rate=2e-3, warmup_steps=50, weight_decay=1e-4, seed=arg.seed, log_every=50,
      checkpoint_every=200, eval_neighbors=16))

  # `dprdm embed`: stores of image and caption embeddings, written in resumable chunks.
  # key: which of the two private retrieval searches by ("caption" or "image"); the values
  # averaged for the model are always the image embeddings (README, "The embedded default").
  config.embed = ml_collections.ConfigDict(dict(
      out="runs/default/embeddings", batch_size=512, chunk_size=8192, key="caption",
      image_tower="default", text_tower="minilm"))

  # The U-Net, its diffusion and its training (`dprdm train`) on the public set, conditioned on
  # each image's 4 nearest public neighbours in the public image store written by `dprdm embed`.
  config.model = config_lib.model_config(unet.OFFLINE_CONFIG)
  # eta = 1 (DDPM's ancestral steps on the DDIM grid) instead of the paper's deterministic 0: after
  # 3,000 steps on 2 cores the model's eps is still rough, and fresh noise at every step hides
  # that far better than eta = 0, which keeps every early error (README, "The trained default").
  config.diffusion = config_lib.diffusion_config(eta=1.0)
  config.train = ml_collections.ConfigDict(dict(
      workdir="runs/default/unet", embeddings="runs/default/embeddings/public-train/images",
      num_neighbors=4, batch_size=64, steps=3000, learning_rate=3e-4, warmup_steps=200,
      grad_clip=1.0, weight_decay=0.0, ema_decay=0.999, seed=arg.seed, log_every=50,
      checkpoint_every=500, keep_checkpoints=2))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_rules = config_lib.LOGICAL_RULES
  if arg.tiny:
    config.model.update(base_channels=16, channel_mult=(1, 2), attention_resolutions=(16,),
                        head_channels=16, norm_groups=4)
    config.train.update(batch_size=16, steps=8, warmup_steps=2, log_every=2, checkpoint_every=4)
    config.encoder.update(width=32, depth=1, steps=6, batch_size=32, warmup_steps=2, log_every=2,
                          checkpoint_every=3, eval_neighbors=4)
    config.embed.update(batch_size=64, chunk_size=1000)
  return config.lock()
