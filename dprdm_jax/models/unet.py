"""The retrieval-augmented diffusion U-Net: predicts the noise ε from a noisy image, t and context.

The architecture is latent diffusion's UNetModel with spatial transformers, as the DP-RDM paper
trained it (README, "The U-Net and its training"): an encoder of residual blocks per level with
a strided-conv downsampling between levels, a middle block (residual, transformer, residual), and
a decoder that concatenates the encoder's saved activations, with nearest-neighbour upsampling.
At the feature-map sizes in `attention_resolutions`, and always in the middle, each residual block
is followed by a spatial transformer whose cross-attention reads the context: the (noisy,
aggregated) retrieved neighbour embeddings, (B, L, context_dim). L = 1 is the compact aggregate
the privacy mechanism releases; cross-attention to k identical tokens equals attention to one, so
it is never repeated.

Deliberate differences from LDM: only the final output convolution is zero-initialised (LDM also
zeroes each residual block's last convolution and each transformer's output projection), so the
context changes the output as soon as the output layer moves; GEGLU's value and gate are two
layers rather than one split in two (the same parameters); and an optional patch stem
(`patch_size`) folds pixel patches into channels, which on CPUs matters more than any other
choice: XLA's kernel gradient of a 3x3 convolution on 32x32 maps runs at about 3 GFLOP/s on two
cores, 15-25 times slower than the forward convolution, while at 16x16 it costs about twice it.

Logical axis names, one per parameter axis, carried in each parameter's `out_sharding` metadata
(eager sharding off, so no mesh is needed to build the model) and listed by `logical_axes`:

  conv_height, conv_width  the spatial axes of a convolution kernel.
  channels_in              the input-channel axis of a convolution kernel or of a
                           channel-to-channel projection (a transformer's projections in and out).
  channels                 the U-Net's feature channels: outputs of convolutions and projections,
                           their biases, the inputs of attention's queries, keys and values and of
                           the MLP, the outputs of the per-block time-embedding projections.
  embed                    the timestep embedding (4 x base_channels wide) that residual blocks
                           read.
  mlp                      hidden units: the time-embedding MLP's and the transformer MLP's (4x).
  heads                    attention's inner axis, heads x head_channels, flattened.
  context                  the context (retrieved embedding) axis that cross-attention reads.
  norm                     the scales and biases of group and layer norms.

A sharding module maps names to mesh axes with a rule table, e.g. by
`jax.tree.map(rule, logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))`, or with flax's
`nnx.get_partition_spec` inside `nnx.logical_axis_rules(rules)`.
"""

import dataclasses
import json
import math
from typing import Optional, Union

from flax import nnx
import jax
import jax.numpy as jnp

from dprdm_jax import errors
from dprdm_jax.models import layers

LOGICAL_AXES = layers.LOGICAL_AXES


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's shape and precision; the defaults are the offline model (32x32 grayscale, MiniLM).

  patch_size p folds each p x p patch of pixels into channels (pixel unshuffle) before the first
  convolution and unfolds the output the same way: the U-Net then works on (resolution/p)^2 maps of
  p^2 * in_channels channels. Exact and invertible, it stands in for the paper's latent autoencoder
  in dividing the positions by p^2; 1 turns it off. attention_resolutions are feature-map sizes
  after patching (16 means the 16x16 maps), not LDM's downsampling factors. norm_groups is the
  GroupNorm group count: 32 as in LDM, fewer for narrow models. dtype is the compute dtype,
  param_dtype the storage dtype of the parameters.
  """

  resolution: int = 32
  in_channels: int = 1
  out_channels: int = 1
  patch_size: int = 2
  base_channels: int = 32
  channel_mult: tuple = (1, 2, 2)
  num_res_blocks: int = 1
  attention_resolutions: tuple = (8,)
  head_channels: int = 32
  transformer_depth: int = 1
  context_dim: int = 384
  norm_groups: int = 8
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    # Tuples even when built from JSON lists or config dicts, so configs compare and hash.
    object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
    object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
    self._validate()

  def _validate(self):
    for name in ("resolution", "in_channels", "out_channels", "patch_size", "base_channels",
                 "num_res_blocks", "head_channels", "transformer_depth", "context_dim",
                 "norm_groups"):
      if getattr(self, name) < 1:
        raise errors.InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if not self.channel_mult or min(self.channel_mult) < 1:
      raise errors.InputError(f"channel_mult must be positive integers, got {self.channel_mult}")
    if not 0.0 <= self.dropout < 1.0:
      raise errors.InputError(f"dropout must be in [0, 1), got {self.dropout}")
    for name in ("dtype", "param_dtype"):
      try:
        kind = jnp.dtype(getattr(self, name))
      except TypeError:
        kind = None
      if kind is None or not jnp.issubdtype(kind, jnp.floating):
        raise errors.InputError(f"{name} must name a floating-point dtype, got "
                                f"{getattr(self, name)!r}")
    if self.resolution % self.patch_size:
      raise errors.InputError(f"resolution {self.resolution} does not split into patches of "
                              f"patch_size={self.patch_size}")
    size, halvings = self.resolution // self.patch_size, len(self.channel_mult) - 1
    if size % 2**halvings:
      raise errors.InputError(f"the {size}x{size} maps after patching do not halve {halvings} "
                              f"times (channel_mult {self.channel_mult}); their size must divide "
                              f"by {2**halvings}")
    sizes = self.feature_sizes
    unknown = sorted(set(self.attention_resolutions) - set(sizes))
    if unknown:
      raise errors.InputError(f"attention_resolutions {unknown} are not feature-map sizes of this "
                              f"U-Net (they are {sizes}; sizes, not LDM's downsampling factors)")
    widths = [self.base_channels] + [self.base_channels * m for m in self.channel_mult]
    for width in widths:
      if width % self.norm_groups:
        raise errors.InputError(f"{width} channels do not split into "
                                f"norm_groups={self.norm_groups} groups (widths "
                                f"{sorted(set(widths))})")
    # The middle block always attends; so does every level at an attention resolution.
    attending = {self.base_channels * self.channel_mult[-1]} | {
        self.base_channels * m for m, size in zip(self.channel_mult, sizes)
        if size in self.attention_resolutions}
    for width in sorted(attending):
      if width % self.head_channels:
        raise errors.InputError(f"{width} channels at an attention level do not divide into heads "
                                f"of head_channels={self.head_channels}")

  @property
  def feature_sizes(self) -> tuple:
    """The feature-map size of each level, from the patched input's down."""
    size = self.resolution // self.patch_size
    return tuple(size // 2**level for level in range(len(self.channel_mult)))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "UNetConfig":
    return cls(**json.loads(text))


# The paper's model on its 64x64x3 latent: attention at the 32, 16 and 8 feature maps, which is
# LDM's attention_resolutions (2, 4, 8) in downsampling factors. 400,920,579 parameters.
PAPER_CONFIG = UNetConfig(
    resolution=64, in_channels=3, out_channels=3, patch_size=1, base_channels=192,
    channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_resolutions=(32, 16, 8),
    head_channels=32, transformer_depth=1, context_dim=512, norm_groups=32)

# The offline default, sized by measurement on two CPU cores (batch 64, float32, forward, backward
# and AdamW): 1,577,124 parameters; 1.15-1.5 s a step (42-55 examples/s) and 230-280 images/s
# forward. Without patches (patch_size=1) the same widths take 10 s a step (6 examples/s); with
# attention only in the middle (attention_resolutions=()) 57-71 examples/s.
OFFLINE_CONFIG = UNetConfig()


class _Block(nnx.Module):
  """A residual block, followed by a spatial transformer at attention resolutions."""

  def __init__(self, channels_in: int, channels_out: int, attend: bool, config: UNetConfig,
               p: layers.Precision, rngs: nnx.Rngs):
    c = config
    self.res = layers.ResBlock(channels_in, channels_out, 4 * c.base_channels, c.norm_groups,
                               c.dropout, p, rngs)
    self.attn = layers.SpatialTransformer(
        channels_out, c.context_dim, c.head_channels, c.transformer_depth, c.norm_groups, p,
        rngs) if attend else None

  def __call__(self, x, emb, context, deterministic, rngs):
    x = self.res(x, emb, deterministic, rngs)
    return x if self.attn is None else self.attn(x, context)


class _Level(nnx.Module):
  """The blocks of one feature-map size and the resampling that leaves it (None at the end)."""

  def __init__(self, blocks: list, resample):
    self.blocks = nnx.List(blocks)
    self.resample = resample


class UNet(nnx.Module):
  """(x (B, H, W, C), t (B,), context (B, L, context_dim)) -> ε (B, H, W, out_channels) float32."""

  def __init__(self, config: UNetConfig, rngs: nnx.Rngs):
    self.config = config
    c = config
    p = layers.Precision(jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
    embed_dim = 4 * c.base_channels
    self.time_hidden = p.linear(c.base_channels, embed_dim, ("channels", "mlp"), rngs)
    self.time_out = p.linear(embed_dim, embed_dim, ("mlp", "embed"), rngs)
    patch = c.patch_size**2
    self.conv_in = p.conv(patch * c.in_channels, c.base_channels, rngs)

    # Encoder; `skips` records the width of every activation the decoder will concatenate.
    width, skips, down = c.base_channels, [c.base_channels], []
    last = len(c.channel_mult) - 1
    for level, (mult, size) in enumerate(zip(c.channel_mult, c.feature_sizes)):
      blocks = []
      for _ in range(c.num_res_blocks):
        blocks.append(_Block(width, c.base_channels * mult, size in c.attention_resolutions, c, p,
                             rngs))
        width = c.base_channels * mult
        skips.append(width)
      resample = None
      if level < last:
        resample = layers.Downsample(width, p, rngs)
        skips.append(width)
      down.append(_Level(blocks, resample))
    self.down = nnx.List(down)

    self.middle = _Block(width, width, True, c, p, rngs)
    self.middle_out = layers.ResBlock(width, width, embed_dim, c.norm_groups, c.dropout, p, rngs)

    # Decoder: one block more per level than the encoder, each reading one saved activation.
    up = []
    for level in reversed(range(len(c.channel_mult))):
      mult, size = c.channel_mult[level], c.feature_sizes[level]
      blocks = []
      for _ in range(c.num_res_blocks + 1):
        blocks.append(_Block(width + skips.pop(), c.base_channels * mult,
                             size in c.attention_resolutions, c, p, rngs))
        width = c.base_channels * mult
      up.append(_Level(blocks, layers.Upsample(width, p, rngs) if level else None))
    self.up = nnx.List(up)

    self.norm_out = p.group_norm(width, c.norm_groups, rngs)
    # Zero-initialised: the model starts by predicting ε = 0 (LDM's zero_module).
    self.conv_out = p.conv(width, patch * c.out_channels, rngs, zero=True)

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, *,
               deterministic: bool = True, rngs: Optional[nnx.Rngs] = None) -> jax.Array:
    """The ε prediction. `rngs`, if given, draws the dropout masks instead of the model's own."""
    c = self.config
    if x.ndim != 4 or x.shape[1:] != (c.resolution, c.resolution, c.in_channels):
      raise errors.InputError(f"x must be (B, {c.resolution}, {c.resolution}, {c.in_channels}), "
                              f"got {x.shape}")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.context_dim:
      raise errors.InputError(f"context must be (B={x.shape[0]}, L, {c.context_dim}), got "
                              f"{context.shape}")
    t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
    emb = layers.timestep_embedding(t, c.base_channels)
    emb = self.time_out(nnx.silu(self.time_hidden(emb)))
    context = context.astype(c.dtype)

    h = self.conv_in(_fold(x, c.patch_size))
    skips = [h]
    for level in self.down:
      for block in level.blocks:
        h = block(h, emb, context, deterministic, rngs)
        skips.append(h)
      if level.resample is not None:
        h = level.resample(h)
        skips.append(h)

    h = self.middle(h, emb, context, deterministic, rngs)
    h = self.middle_out(h, emb, deterministic, rngs)

    for level in self.up:
      for block in level.blocks:
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb, context, deterministic, rngs)
      if level.resample is not None:
        h = level.resample(h)

    h = self.conv_out(nnx.silu(self.norm_out(h)))
    return _unfold(h, c.patch_size).astype(jnp.float32)


def _fold(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one position's channels."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def _unfold(x: jax.Array, p: int) -> jax.Array:
  """The inverse of _fold."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def init_rngs(seed: int) -> nnx.Rngs:
  """Rngs for building a U-Net under a trace (nnx.jit, nnx.eval_shape): use these, not nnx.Rngs.

  Their counters are mutable array refs. A plain Rngs counter updated under a trace makes flax
  (0.12.8) read the traced value's `sharding`, which jax answers by walking the whole trace so far:
  quadratic in the draws, so the paper model's abstract build takes 25-100 s on two cores instead
  of 4.
  """
  with nnx.var_defaults(ref=True):
    return nnx.Rngs(seed)


def logical_axes(model_or_state: Union[nnx.Module, nnx.State]) -> nnx.State:
  """Each parameter's logical axis names: a State shaped like nnx.state(model, nnx.Param).

  Its leaves are tuples of names from LOGICAL_AXES, one per axis of the parameter; map over them
  with `is_leaf=lambda x: isinstance(x, tuple)`. Takes a model, abstract or not, or its state.
  """
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  return jax.tree.map(lambda v: tuple(v.get_metadata("out_sharding")), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_count(config: UNetConfig) -> int:
  """The number of parameters, counted on an abstract model (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: UNet(config, init_rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
