"""Configs: get_config(arg), typed arguments, command-line overrides, the privacy block."""

import pytest

from dprdm_jax import config_lib
from dprdm_jax.privacy import accounting

CONFIGS = ["configs/default.py", "configs/default.py:tiny", "configs/coco.py",
           "configs/coco.py:tiny", "configs/cifar10.py", "configs/cifar10.py:tiny"]
load = config_lib.load


@pytest.mark.parametrize("path", CONFIGS)
def test_privacy_block_is_complete_and_valid(path):
  privacy = load(path).privacy
  for field in ("sampling_rate", "num_neighbors", "noise_std", "interpolation", "delta",
                "epsilon_budget", "accountant"):
    assert field in privacy
  accounting.Mechanism(privacy.noise_std, privacy.sampling_rate, privacy.num_neighbors)
  accounting.check_accountant(privacy.accountant)
  assert 0 <= privacy.interpolation <= 1


@pytest.mark.parametrize("path", ["configs/default.py", "configs/coco.py", "configs/cifar10.py"])
def test_documented_settings_fit_their_budget(path):
  """Each config's planned T queries stay within its own budget at delta = 1/N."""
  privacy = load(path).privacy
  mechanism = accounting.Mechanism(privacy.noise_std, privacy.sampling_rate, privacy.num_neighbors)
  eps = accounting.history_epsilon({mechanism: privacy.num_queries}, 1 / privacy.dataset_size,
                                   privacy.accountant)
  assert eps <= privacy.epsilon_budget


def test_overrides_reach_every_field():
  config = load("configs/default.py", "--config.privacy.delta=1e-6",
                "--config.privacy.num_neighbors=4", "--config.seed=9")
  assert config.privacy.delta == 1e-6 and config.privacy.num_neighbors == 4 and config.seed == 9


def test_unknown_override_is_an_error():
  with pytest.raises(AttributeError, match="nonsense"):
    load("configs/default.py", "--config.privacy.nonsense=1")


def test_parse_arg_types_and_errors():
  arg = config_lib.parse_arg("tiny,seed=3,name=x,rate=2", tiny=False, seed=0, name="", rate=0.5)
  assert arg.tiny is True and arg.seed == 3 and arg.name == "x" and arg.rate == 2.0
  with pytest.raises(ValueError, match="unknown config argument"):
    config_lib.parse_arg("huge", tiny=False)
  with pytest.raises(ValueError, match="is not a int"):
    config_lib.parse_arg("seed=1.5", seed=0)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("seed", seed=0)


def test_paper_model_builds_from_the_coco_config():
  """The paper's U-Net, built abstractly from configs/coco.py: about 400M parameters."""
  from dprdm_jax import train  # pylint: disable=g-import-not-at-top
  from dprdm_jax.models import unet  # pylint: disable=g-import-not-at-top
  count = unet.param_count(train.model_config(load("configs/coco.py")))
  assert abs(count / 400e6 - 1) < 0.05, count


@pytest.mark.parametrize("path", ["configs/default.py", "configs/default.py:tiny"])
def test_shared_values_follow_their_field_through_command_line_overrides(path):
  config = load(path, "--config.seed=3", "--config.privacy.embedding_dim=32",
                "--config.embed.out=/stores", "--config.data.public=mnist5k",
                "--config.data.private=mnist", "--config.privacy.epsilon_budget=5",
                "--config.privacy.num_queries=7")
  assert config.encoder.seed == config.train.seed == config.classifier.seed == 3
  assert config.encoder.linear_dim == config.model.context_dim == 32
  assert config.train.embeddings == config.generate.public_values == (
      "/stores/mnist5k-train/images")
  assert config.generate.public_keys == "/stores/mnist5k-train/captions"
  assert (config.generate.private_keys, config.generate.private_values) == (
      "/stores/mnist-train/captions", "/stores/mnist-train/images")
  assert (config.evaluate.epsilon, config.evaluate.num_queries) == (5.0, 7)


def test_the_tiny_config_sets_shared_values_once():
  config = load("configs/default.py:tiny")
  assert config.privacy.embedding_dim == config.encoder.linear_dim == config.model.context_dim
  assert config.privacy.embedding_dim != load("configs/default.py").privacy.embedding_dim
  assert (config.evaluate.epsilon, config.evaluate.num_queries) == (
      config.privacy.epsilon_budget, config.privacy.num_queries)


def test_a_follower_overridden_alone_leaves_its_field_and_the_other_followers():
  config = load("configs/default.py", "--config.train.seed=5", "--config.encoder.linear_dim=32",
                "--config.train.embeddings=/x")
  assert config.train.seed == 5 and config.seed == config.encoder.seed == 0
  assert config.classifier.seed == 0
  assert config.model.context_dim == 32 and config.privacy.embedding_dim == 64
  assert config.train.embeddings == "/x" and config.embed.out == "runs/default/embeddings"
  assert config.generate.public_values == "runs/default/embeddings/public-train/images"


@pytest.mark.parametrize("path", ["configs/coco.py", "configs/cifar10.py"])
def test_real_data_configs_follow_the_seed_width_and_stores(path):
  config = load(path, "--config.seed=4", "--config.privacy.embedding_dim=64",
                "--config.embed.out=/e", "--config.data.private_split=val",
                "--config.privacy.num_queries=9")
  assert config.train.seed == 4 and config.model.context_dim == 64
  assert config.train.embeddings == "/e/imagenet2012-train/images"
  assert config.generate.private_keys == f"/e/{config.data.private}-val/captions"
  assert config.evaluate.num_queries == 9
