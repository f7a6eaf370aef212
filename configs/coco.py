"""The paper's MS-COCO setting (DP-RDM, Lebensold et al. 2024, section 5): CLIP B/16, 512-d.

The headline result is MS-COCO at epsilon = 10 over 10,000 queries. The private retrieval set
here is MS-COCO train2017 (118,287 images, so delta = 1/N = 8.5e-6); set privacy.dataset_size to
the size of your private set. k = 16 neighbours of a 1% subsample with sigma = 0.11 (z = 0.88):
10,000 queries cost epsilon = 8.12 (PLD; RDP 8.81), inside the budget of 10.

  dprdm privacy plan --config configs/coco.py            # the README's main job (seconds)
"""

import ml_collections

from dprdm_jax import config_lib
from dprdm_jax.models import unet
from dprdm_jax.retrieval import index as index_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, seed=0)
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.privacy = config_lib.privacy_config(
      dataset_size=118_287, embedding_dim=512, sampling_rate=0.01, num_neighbors=16, noise_std=0.11,
      interpolation=1.0, epsilon_budget=10.0, num_queries=10_000)
  # Private retrieval is always exact (rule R1); these parameters serve `dprdm index build`, whose
  # fast mode is for public data and non-private baselines.
  config.retrieval = ml_collections.ConfigDict(dict(
      index=index_lib.index_config(config.privacy.dataset_size)))
  # The paper's U-Net: 192 base channels, (1, 2, 3, 5), attention at 32, 16 and 8; about 400M
  # parameters (`python -c "from dprdm_jax.models import unet; print(unet.param_count(
  # unet.PAPER_CONFIG))"`). Trained on pods: fsdp over all devices of a host, data across hosts.
  config.model = config_lib.model_config(unet.PAPER_CONFIG)
  config.diffusion = config_lib.diffusion_config()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_rules = config_lib.LOGICAL_RULES
  return config.lock()
