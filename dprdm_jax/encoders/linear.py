"""The offline default's value embedding: a linear projection of pixels fitted on public images.

What the generator draws is whatever the context tells it, so the averaged value embedding must
carry the appearance of images it never saw. The contrastive tower (`image.py`) is fitted to 20
public class captions and keeps little else: its zero-shot accuracy on Fashion-MNIST is 0.05, and
a U-Net conditioned on it takes the private domain's look but rarely the prompted garment. A
principal-component projection keeps appearance instead, for any image: it is the linear map that
best reconstructs the public images, and it reconstructs clothing nearly as well (README, "The
embedded default", has the measurements that chose it and its dimension).

  embedding(x) = normalise(V^T (x - mu))      x: pixels scaled to [-1, 1], flattened
  mu, V:  the mean and the top `dim` principal directions of the PUBLIC training images

A prompt is text, not pixels, so the modes that condition on the prompt alone (no retrieval, or
lambda < 1) need the prompt in the same space: `prompt_map`, a ridge regression from caption
embeddings to image embeddings fitted on the same public records. For a public class it returns
about the mean embedding of the class; for a class no public caption resembles it returns a blend
of public classes, which is what "no retrieval" should show.

Privacy: both maps are fixed functions of public data, fitted before any private record is read,
so retrieval keys and aggregated values satisfy the "fixed function not fitted to private data"
assumption of rules R1-R4.

Stored as one .npz (mean, components, prompt map, their shapes): a closed-form fit has no
optimizer state or steps, so the orbax checkpoint helper of the trained towers would add nothing.
"""

import pathlib

import numpy as np

from dprdm_jax import errors

FILE = "linear_tower.npz"


class LinearTower:
  """uint8 images (n, R, R, C) -> unit-norm (n, dim) embeddings; text -> the same space."""

  def __init__(self, mean: np.ndarray, components: np.ndarray, prompt_weights: np.ndarray,
               image_shape: tuple[int, int, int]):
    self.mean = np.asarray(mean, np.float32)
    self.components = np.asarray(components, np.float32)  # (pixels, dim), orthonormal columns
    self.prompt_weights = np.asarray(prompt_weights, np.float32)  # (text_dim + 1, dim)
    self.image_shape = tuple(int(s) for s in image_shape)
    pixels = int(np.prod(self.image_shape))
    if self.mean.shape != (pixels,) or self.components.shape[0] != pixels:
      raise errors.InputError(f"mean {self.mean.shape} and components {self.components.shape} do "
                              f"not fit images of shape {self.image_shape}")
    if self.prompt_weights.shape[1] != self.dim:
      raise errors.InputError(f"prompt map {self.prompt_weights.shape} does not end in dim "
                              f"{self.dim}")

  @property
  def dim(self) -> int:
    return self.components.shape[1]

  @property
  def text_dim(self) -> int:
    return self.prompt_weights.shape[0] - 1

  def _pixels(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise errors.InputError("images must be uint8 of shape (n, "
                              f"{', '.join(map(str, self.image_shape))}), got {images.dtype} "
                              f"{images.shape}")
    return images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """(n, R, R, C) uint8 -> (n, dim) float32 unit rows (an image equal to the mean maps to 0)."""
    return _unit((self._pixels(images) - self.mean) @ self.components)

  def encode_prompts(self, text_embeddings: np.ndarray) -> np.ndarray:
    """(n, text_dim) caption embeddings -> (n, dim) unit rows in the image embedding space."""
    t = np.asarray(text_embeddings, np.float32)
    if t.ndim != 2 or t.shape[1] != self.text_dim:
      raise errors.InputError(f"text embeddings must be (n, {self.text_dim}), got {t.shape}")
    return _unit(np.concatenate([t, np.ones((len(t), 1), np.float32)], 1) @ self.prompt_weights)

  def save(self, workdir) -> pathlib.Path:
    path = pathlib.Path(workdir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mean=self.mean, components=self.components,
             prompt_weights=self.prompt_weights, image_shape=np.asarray(self.image_shape))
    tmp.replace(path)
    return path


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def fit(images: np.ndarray, text_embeddings: np.ndarray, dim: int,
        ridge: float = 1e-3) -> LinearTower:
  """The projection of the top `dim` principal directions of public `images` (n, R, R, C) uint8,
  and the ridge map from their captions' embeddings (n, text_dim) to their image embeddings.

  Deterministic: an SVD of the centred pixels, each direction's sign fixed so that its largest
  entry is positive.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise errors.InputError(f"images must be uint8 (n, R, R, C), got {images.dtype} {images.shape}")
  x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
  if not 1 <= dim <= min(x.shape):
    raise errors.InputError(f"dim must lie in [1, {min(x.shape)}] for {x.shape[0]} images of "
                            f"{x.shape[1]} pixels, got {dim}")
  t = np.asarray(text_embeddings, np.float32)
  if t.shape[:1] != (len(x),) or t.ndim != 2:
    raise errors.InputError(f"need one text embedding per image, got {t.shape} for {len(x)} images")
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  components = vt[:dim].T
  components *= np.sign(components[np.abs(components).argmax(axis=0), np.arange(dim)])
  tower = LinearTower(mean, components, np.zeros((t.shape[1] + 1, dim)), images.shape[1:])
  targets = tower.encode_images(images)
  a = np.concatenate([t, np.ones((len(t), 1), np.float32)], 1)
  weights = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ targets)
  return LinearTower(mean, components, weights, images.shape[1:])


def load(workdir) -> LinearTower:
  """The tower fitted by `dprdm train-encoder` into `workdir`."""
  path = pathlib.Path(workdir) / FILE
  if not path.is_file():
    raise errors.MissingError(f"{path} is missing; run `dprdm train-encoder` first")
  with np.load(path) as f:
    return LinearTower(f["mean"], f["components"], f["prompt_weights"], tuple(f["image_shape"]))
