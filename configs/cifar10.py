"""The paper's CIFAR-10 setting (DP-RDM, Lebensold et al. 2024, section 5): CLIP B/16, 512-d.

Public side shared with configs/coco.py (runs/paper: ImageNet at 64x64 and the paper's U-Net;
train it once with either config). Private side: CIFAR-10 train (50,000 images, upsampled to
64x64, delta = 1/N = 2e-5), each record captioned "a {class}, high quality photograph", the
paper's prompts; CIFAR-10 test is the evaluation's reference set. k = 16 neighbours of a 2%
subsample (1,000 records a query, about 100 of the prompted class) with sigma = 0.085 (z = 0.68):
1,000 queries cost epsilon = 9.40 (PLD; RDP 10.67), inside the budget of 10.

Needs CLIP in a local directory (README, "Real data"; default models/clip-vit-base-patch16,
`--config configs/cifar10.py:clip=DIR` for another) and cifar10 and imagenet2012 prepared for
tensorflow-datasets in the ArrayRecord format. The jobs, in order:

  dprdm privacy plan --config configs/cifar10.py                   # the budget (seconds)
  dprdm embed --config configs/cifar10.py --dataset imagenet2012 --split train   # shared
  dprdm embed --config configs/cifar10.py --dataset cifar10 --split train
  dprdm train --config configs/cifar10.py                          # shared with configs/coco.py
  dprdm generate --config configs/cifar10.py --prompt "a horse, high quality photograph"
  dprdm evaluate --config configs/cifar10.py                       # the paper's comparison

Expected time: not measured on an accelerator by this project yet (see configs/coco.py).

  --config configs/cifar10.py:tiny,clip=DIR    tiny sizes for tests, with a tiny CLIP in DIR
"""

from dprdm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, seed=0, clip="models/clip-vit-base-patch16")
  privacy = config_lib.privacy_config(
      dataset_size=50_000, embedding_dim=512, sampling_rate=0.02, num_neighbors=16,
      noise_std=0.085, interpolation=1.0, epsilon_budget=10.0, num_queries=1_000)
  if arg.tiny:
    privacy.embedding_dim = 16
  # The ten class prompts, 100 images each per sweep setting and 500 per final mode.
  evaluate = dict(neighbors=(8, 16, 32), sampling_rates=(0.01, 0.02, 0.05),
                  query_counts=(100, 1_000, 10_000), sweep_per_prompt=100, final_per_prompt=500,
                  reference_split="test", reference_size=10_000, num_prompts=10)
  config = config_lib.real_data_config(arg, private="cifar10", private_split="train",
                                       privacy=privacy, evaluate=evaluate)
  if arg.tiny:
    config.evaluate.num_prompts = 3
  return config.lock()
