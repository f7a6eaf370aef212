"""The default image tower: a small residual MLP mapping images into the text tower's space.

No pretrained image model installs offline, so the project trains this one on public data only
(`dprdm train-encoder`, jobs in dprdm_jax/train_encoder.py), contrastively against the frozen
text tower's caption embeddings (a locked text tower, as in LiT). Its output is an L2-normalised
vector of the text tower's width; the embedding job stores it as each record's image embedding.

Architecture: the flattened pixels (uint8 / 127.5 - 1) through a linear layer of `width`, `depth`
residual blocks (LayerNorm, Dense 2*width, GELU, Dense width), a LayerNorm and a linear projection
to `dim`. An MLP, not a CNN: the offline images are centred 32x32 silhouettes, and on two CPU
cores a convolutional tower of similar accuracy trained and embedded 10-30 times slower
(XLA's CPU convolutions; measured 32-97 vs 1000s of images/s).
"""

import dataclasses
import json
import pathlib
from typing import Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """The tower's shape: what a checkpoint needs to rebuild it."""

  width: int = 512
  depth: int = 2
  dim: int = 384
  in_channels: int = 1
  resolution: int = 32

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "TowerConfig":
    return cls(**json.loads(text))


class _Block(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class ImageTower(nnx.Module):
  """uint8 images (n, R, R, C) -> unit-norm embeddings (n, dim) float32."""

  def __init__(self, config: TowerConfig, rngs: nnx.Rngs):
    self.config = config
    pixels = config.resolution * config.resolution * config.in_channels
    self.embed = nnx.Linear(pixels, config.width, rngs=rngs)
    self.blocks = nnx.List([_Block(config.width, rngs) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.width, rngs=rngs)
    self.project = nnx.Linear(config.width, config.dim, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    x = self.project(self.norm(x))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ImageEncoder:
  """A trained tower behind the encoders' common interface: `dim`, `encode_images`."""

  def __init__(self, tower: ImageTower, batch_size: int = 512,
               sharding: Optional[jax.sharding.NamedSharding] = None):
    """`sharding`, if given, splits each (padded) batch over a mesh's data axis."""
    self.config = tower.config
    self.batch_size = batch_size
    self._sharding = sharding
    graphdef, state = nnx.split(tower)
    if sharding is not None:  # parameters replicated on the batch's mesh
      state = jax.device_put(state, jax.sharding.NamedSharding(sharding.mesh,
                                                               jax.sharding.PartitionSpec()))
    self._state = state

    @jax.jit
    def forward(state, images):
      return nnx.merge(graphdef, state)(images)

    self._forward = forward

  @property
  def dim(self) -> int:
    return self.config.dim

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """(n, R, R, C) uint8 -> (n, dim) float32 unit rows; batches padded to one compiled shape."""
    images = np.asarray(images)
    c = self.config
    if images.dtype != np.uint8 or images.shape[1:] != (c.resolution, c.resolution,
                                                        c.in_channels):
      raise errors.InputError(f"images must be uint8 of shape (n, {c.resolution}, {c.resolution}, "
                              f"{c.in_channels}), got {images.dtype} {images.shape}")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      batch = jax.device_put(padded, self._sharding) if self._sharding else padded
      out.append(np.asarray(self._forward(self._state, batch))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, c.dim), np.float32)


def init(config: TowerConfig, seed: int) -> ImageTower:
  """A freshly initialised tower (built in one compiled call, not one per parameter)."""
  return nnx.jit(lambda: ImageTower(config, nnx.Rngs(seed)))()


CONFIG_FILE = "tower_config.json"


def load(workdir, batch_size: int = 512,
         sharding: Optional[jax.sharding.NamedSharding] = None) -> ImageEncoder:
  """The tower of the latest checkpoint of `dprdm train-encoder` in `workdir` (the entry
  params["tower"] of its train state), as an ImageEncoder."""
  # Imported here: orbax is only needed to read a trained tower.
  from dprdm_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dprdm_jax import training  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir).absolute()
  config_path = workdir / CONFIG_FILE
  if not config_path.is_file():
    raise errors.MissingError(f"{workdir} holds no trained image tower ({CONFIG_FILE} is missing); "
                              "run `dprdm train-encoder` first")
  config = TowerConfig.from_json(config_path.read_text())
  tower = training.NnxModel(lambda seed: ImageTower(config, nnx.Rngs(seed)))
  restored = checkpoints.restore_latest(workdir, {"params": {"tower": tower.abstract_params}})
  if restored is None:
    raise errors.MissingError(f"{workdir}/checkpoints holds no complete checkpoint")
  return ImageEncoder(tower(restored[1]["params"]["tower"]), batch_size, sharding)


def class_logits(image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
  """Cosine similarity of each image to each class caption: zero-shot logits (n, classes)."""
  return np.asarray(image_embeddings) @ np.asarray(class_embeddings).T


def zero_shot_accuracy(encoder: ImageEncoder, images: np.ndarray, labels: Sequence[int],
                       class_embeddings: np.ndarray) -> float:
  """Share of images whose most similar class caption is their own class."""
  logits = class_logits(encoder.encode_images(images), class_embeddings)
  return float((logits.argmax(axis=1) == np.asarray(labels)).mean())
