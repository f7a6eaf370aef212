"""The denoising networks: the retrieval-augmented diffusion U-Net (unet.py) and its blocks."""

from dprdm_jax.models.unet import LOGICAL_AXES
from dprdm_jax.models.unet import init_rngs
from dprdm_jax.models.unet import logical_axes
from dprdm_jax.models.unet import OFFLINE_CONFIG
from dprdm_jax.models.unet import PAPER_CONFIG
from dprdm_jax.models.unet import param_count
from dprdm_jax.models.unet import UNet
from dprdm_jax.models.unet import UNetConfig
