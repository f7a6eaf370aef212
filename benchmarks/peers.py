"""The peers' models that more than one benchmark builds."""

from dprdm_jax.models import unet


def torch_unet(c: unet.UNetConfig):
  """diffusers' U-Net on the maps ours works on: (resolution / p)^2 positions of p^2 * channels,
  p = patch_size (the caller folds pixels with pixel_unshuffle, as ours does)."""
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  p = c.patch_size
  sizes = [c.resolution // p // 2**i for i in range(len(c.channel_mult))]
  attend = [s in c.attention_resolutions for s in sizes]
  widths = [c.base_channels * m for m in c.channel_mult]
  return UNet2DConditionModel(
      sample_size=c.resolution // p, in_channels=c.in_channels * p * p,
      out_channels=c.out_channels * p * p,
      block_out_channels=tuple(widths), layers_per_block=c.num_res_blocks,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attend[::-1]),
      # diffusers' attention_head_dim is the number of heads (its issue 2011).
      cross_attention_dim=c.context_dim,
      attention_head_dim=tuple(w // c.head_channels for w in widths), norm_num_groups=c.norm_groups,
      transformer_layers_per_block=c.transformer_depth)
