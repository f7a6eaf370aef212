"""The U-Net's building blocks: residual blocks, spatial transformers, resampling, time embedding.

The blocks follow latent diffusion's UNetModel (the architecture the DP-RDM paper trained):
pre-activation residual blocks with the timestep embedding added between their two convolutions,
and spatial transformers that read the retrieved context through cross-attention.

Every parameter carries logical axis names (`LOGICAL_AXES`, meanings in dprdm_jax/models/unet.py)
in flax's `out_sharding` metadata with eager sharding off: the model builds anywhere without a mesh,
and the sharding module maps the names to mesh axes with its own rule table when it places the
parameters.
"""

import dataclasses
import math
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

LOGICAL_AXES = ("conv_height", "conv_width", "channels_in", "channels", "embed", "mlp", "heads",
                "context", "norm")

# The same epsilon for group and layer norms, as in latent diffusion's torch defaults.
_NORM_EPSILON = 1e-5
_CONV_NAMES = ("conv_height", "conv_width", "channels_in", "channels")


def _named(*names: str) -> dict:
  """Parameter metadata: logical axis names, placed later by the sharding module, not eagerly."""
  return {"out_sharding": names, "eager_sharding": False}


@dataclasses.dataclass(frozen=True)
class Precision:
  """Builds named layers that compute in `compute` and store parameters in `param`."""

  compute: jnp.dtype
  param: jnp.dtype

  def linear(self, features_in: int, features_out: int, names: tuple, rngs: nnx.Rngs, *,
             use_bias: bool = True) -> nnx.Linear:
    """A dense layer; `names` name its kernel's two axes, the bias takes the second."""
    return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=self.compute,
                      param_dtype=self.param, kernel_metadata=_named(*names),
                      bias_metadata=_named(names[1]), rngs=rngs)

  def conv(self, channels_in: int, channels_out: int, rngs: nnx.Rngs, *, kernel: int = 3,
           stride: int = 1, zero: bool = False) -> nnx.Conv:
    """A 2-D convolution padded like torch's `padding=kernel // 2` (LDM's strided downsampling)."""
    pad = kernel // 2
    extra = {"kernel_init": nnx.initializers.zeros_init()} if zero else {}
    return nnx.Conv(channels_in, channels_out, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), dtype=self.compute, param_dtype=self.param,
                    kernel_metadata=_named(*_CONV_NAMES), bias_metadata=_named("channels"),
                    rngs=rngs, **extra)

  def group_norm(self, channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Statistics are computed in float32 whatever the compute dtype (flax promotes them).
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=_NORM_EPSILON, dtype=self.compute,
                         param_dtype=self.param, scale_metadata=_named("norm"),
                         bias_metadata=_named("norm"), rngs=rngs)

  def layer_norm(self, channels: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(channels, epsilon=_NORM_EPSILON, dtype=self.compute,
                         param_dtype=self.param, scale_metadata=_named("norm"),
                         bias_metadata=_named("norm"), rngs=rngs)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal features (B, dim) float32 of timesteps (B,): cosines then sines, as in LDM."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResBlock(nnx.Module):
  """GroupNorm, SiLU, conv; + projected time embedding; GroupNorm, SiLU, dropout, conv; + skip."""

  def __init__(self, channels_in: int, channels_out: int, embed_dim: int, groups: int,
               dropout: float, p: Precision, rngs: nnx.Rngs):
    self.norm_in = p.group_norm(channels_in, groups, rngs)
    self.conv_in = p.conv(channels_in, channels_out, rngs)
    self.embed = p.linear(embed_dim, channels_out, ("embed", "channels"), rngs)
    self.norm_out = p.group_norm(channels_out, groups, rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv_out = p.conv(channels_out, channels_out, rngs)
    # A 1x1 convolution matches widths on the skip path only where they differ.
    self.skip = p.conv(channels_in, channels_out, rngs, kernel=1) if (
        channels_in != channels_out) else None

  def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool,
               rngs: Optional[nnx.Rngs]) -> jax.Array:
    h = self.conv_in(nnx.silu(self.norm_in(x)))
    h = h + self.embed(nnx.silu(emb))[:, None, None, :]
    h = self.dropout(nnx.silu(self.norm_out(h)), deterministic=deterministic, rngs=rngs)
    h = self.conv_out(h)
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nnx.Module):
  """Multi-head attention of tokens (B, T, channels) to a source (B, S, source_dim)."""

  def __init__(self, channels: int, source_dim: int, source_name: str, head_channels: int,
               p: Precision, rngs: nnx.Rngs):
    self.heads = channels // head_channels
    self.head_channels = head_channels
    # No biases on q, k, v, as in LDM; `source_name` names the axis keys and values read from.
    self.query = p.linear(channels, channels, ("channels", "heads"), rngs, use_bias=False)
    self.key = p.linear(source_dim, channels, (source_name, "heads"), rngs, use_bias=False)
    self.value = p.linear(source_dim, channels, (source_name, "heads"), rngs, use_bias=False)
    self.out = p.linear(channels, channels, ("heads", "channels"), rngs)

  def __call__(self, x: jax.Array, source: jax.Array) -> jax.Array:
    def split(h):
      return h.reshape(h.shape[:2] + (self.heads, self.head_channels))

    # jax's attention takes softmax in float32 for half-precision inputs.
    h = jax.nn.dot_product_attention(split(self.query(x)), split(self.key(source)),
                                     split(self.value(source)))
    return self.out(h.reshape(x.shape[:2] + (-1,)))


class TransformerLayer(nnx.Module):
  """LN, self-attention; LN, cross-attention to the context; LN, GEGLU MLP (4x); each residual."""

  def __init__(self, channels: int, context_dim: int, head_channels: int, p: Precision,
               rngs: nnx.Rngs):
    self.norm_self = p.layer_norm(channels, rngs)
    self.self_attention = Attention(channels, channels, "channels", head_channels, p, rngs)
    self.norm_cross = p.layer_norm(channels, rngs)
    self.cross_attention = Attention(channels, context_dim, "context", head_channels, p, rngs)
    self.norm_mlp = p.layer_norm(channels, rngs)
    # GEGLU's value and gate as two layers (LDM stores one of twice the width and splits it):
    # the same parameters, and the "mlp" axis shards without a split in the middle.
    hidden = 4 * channels
    self.mlp_value = p.linear(channels, hidden, ("channels", "mlp"), rngs)
    self.mlp_gate = p.linear(channels, hidden, ("channels", "mlp"), rngs)
    self.mlp_out = p.linear(hidden, channels, ("mlp", "channels"), rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    h = self.norm_self(x)
    x = x + self.self_attention(h, h)
    x = x + self.cross_attention(self.norm_cross(x), context)
    h = self.norm_mlp(x)
    # Exact (erf) GELU, as torch's default in LDM's GEGLU.
    return x + self.mlp_out(self.mlp_value(h) * nnx.gelu(self.mlp_gate(h), approximate=False))


class SpatialTransformer(nnx.Module):
  """GroupNorm, 1x1 projection in, transformer layers over the H*W tokens, projection out; residual.

  The projections are dense layers over the flattened tokens, equal to LDM's 1x1 convolutions.
  """

  def __init__(self, channels: int, context_dim: int, head_channels: int, depth: int, groups: int,
               p: Precision, rngs: nnx.Rngs):
    self.norm = p.group_norm(channels, groups, rngs)
    self.project_in = p.linear(channels, channels, ("channels_in", "channels"), rngs)
    self.layers = nnx.List([TransformerLayer(channels, context_dim, head_channels, p, rngs)
                            for _ in range(depth)])
    self.project_out = p.linear(channels, channels, ("channels_in", "channels"), rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = self.project_in(self.norm(x).reshape(batch, height * width, channels))
    for layer in self.layers:
      h = layer(h, context)
    return x + self.project_out(h).reshape(x.shape)


class Downsample(nnx.Module):
  """Halves the feature map with a stride-2 3x3 convolution."""

  def __init__(self, channels: int, p: Precision, rngs: nnx.Rngs):
    self.conv = p.conv(channels, channels, rngs, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Doubles the feature map: nearest-neighbour repeat, then a 3x3 convolution."""

  def __init__(self, channels: int, p: Precision, rngs: nnx.Rngs):
    self.conv = p.conv(channels, channels, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
