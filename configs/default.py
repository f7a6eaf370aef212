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
  return config.lock()
