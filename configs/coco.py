"""The paper's MS-COCO setting (DP-RDM, Lebensold et al. 2024, section 5): CLIP B/16, 512-d.

Public side (shared with configs/cifar10.py, under runs/paper): ImageNet (tfds imagenet2012) at
64x64, the paper's U-Net (about 400M parameters) trained on it. Private side: MS-COCO 2014, the
Karpathy train and restval splits (82,783 + 30,504 = 113,287 images, so delta = 1/N = 8.8e-6),
each image's first caption; evaluation prompts are the first 1,000 captions of Karpathy val and
its images the reference set (never retrieved from). k = 16 neighbours of a 1% subsample with
sigma = 0.11 (z = 0.88): 10,000 queries cost epsilon = 8.10 (PLD; RDP 8.80), inside the budget of
10. The paper's headline, MS-COCO at epsilon = 10 over 10,000 queries: FID 14.4 with public-only
retrieval, 10.9 with DP retrieval (Inception features, 256x256 latents; ours are pixel-space
64x64 and CLIP features, so the figures are not comparable, only the ordering is).

Needs: CLIP saved to a local directory (README, "Real data"), e.g. models/clip-vit-base-patch16
(the default; `--config configs/coco.py:clip=DIR` for another), and imagenet2012 and
coco_captions prepared for tensorflow-datasets in the ArrayRecord format. The jobs, in order
(launch/tpu.sh runs embed and train on every worker of a pod slice, the others on a
single-host slice):

  dprdm privacy plan --config configs/coco.py                      # the budget (seconds)
  dprdm embed --config configs/coco.py --dataset imagenet2012 --split train
  dprdm embed --config configs/coco.py --dataset coco_captions --split train+restval
  dprdm train --config configs/coco.py                             # the public U-Net
  dprdm generate --config configs/coco.py --prompt "a dog on a beach"
  dprdm evaluate --config configs/coco.py                          # the paper's comparison

Expected time: not measured on an accelerator by this project yet (a 2-core CPU cannot run the
400M U-Net at this scale); benchmarks/device_check.sh measures the U-Net step on a GPU. Embedding
is CLIP B/16 at 224x224 over 1.4M images; training is 100,000 steps of batch 1,280.

  --config configs/coco.py:tiny,clip=DIR    tiny sizes for tests, with a tiny CLIP in DIR
"""

from dprdm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, seed=0, clip="models/clip-vit-base-patch16")
  privacy = config_lib.privacy_config(
      dataset_size=113_287, embedding_dim=512, sampling_rate=0.01, num_neighbors=16,
      noise_std=0.11, interpolation=1.0, epsilon_budget=10.0, num_queries=10_000)
  if arg.tiny:
    privacy.embedding_dim = 16
  # Sweep sizes: 1,000 prompts, one image each per sweep setting, five per final mode (5,000).
  evaluate = dict(neighbors=(8, 16, 32), sampling_rates=(0.005, 0.01, 0.02),
                  query_counts=(1_000, 10_000, 100_000), sweep_per_prompt=1, final_per_prompt=5,
                  reference_split="val", reference_size=5_000, num_prompts=1_000)
  config = config_lib.real_data_config(arg, private="coco_captions",
                                       private_split="train+restval", privacy=privacy,
                                       evaluate=evaluate)
  if arg.tiny:
    config.evaluate.num_prompts = 3
  return config.lock()
