"""CLIP towers in Flax: captions and images to unit vectors in CLIP's joint space.

`ClipEncoder.load` reads any checkpoint `transformers.FlaxCLIPModel` reads (a local directory
with Flax or PyTorch safetensors weights, or a hub name) with its tokenizer. Captions are
truncated to the text tower's `max_position_embeddings` (77 for OpenAI's models) and batched as
in `text.py`: shortest first, fixed row counts, lengths padded to power-of-two buckets. CLIP's
text tower is causal and pools at the first end-of-text token, so padding cannot change a row.

Images are uint8 (n, H, W, C), C = 1 (replicated to 3) or 3. They are cut to their centred
square, resized by `jax.image.resize` with bicubic interpolation (Keys, a = -0.5, antialiased
when shrinking) to the model's `image_size`, clipped to [0, 255] and kept in float32, scaled to
[0, 1] and standardised with the checkpoint's preprocessor_config.json `image_mean`/`image_std`,
or OpenAI's constants when it has none. `CLIPImageProcessor` does the same steps with PIL in
another order (shortest side to the model size, then the centre crop) and rounds to uint8 after
resizing, so its pixels differ slightly; square inputs differ only by that rounding.
Parameters and matmuls are float32, and every batch is padded to one fixed row count, so one
compilation serves each image size.
"""

import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from dprdm_jax import errors
from dprdm_jax.encoders import text

DEFAULT_BATCH_SIZE = 256
# OpenAI CLIP's normalisation (CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder:
  """A CLIP model's text and image towers, giving unit float32 vectors of `projection_dim`."""

  def __init__(self, model: transformers.FlaxCLIPModel, params,
               tokenizer: transformers.PreTrainedTokenizerBase,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """Wraps a loaded model; use `ClipEncoder.load`."""
    self._tokenizer = tokenizer
    self._params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    self._dim = model.config.projection_dim
    self._max_length = model.config.text_config.max_position_embeddings
    self._image_size = model.config.vision_config.image_size
    self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
      raise errors.InputError(f"image mean and std must be 3 values, std positive; got {mean}, "
                              f"{std}")
    self._mean, self._std = tuple(mean.tolist()), tuple(std.tolist())
    self._text_forward = jax.jit(functools.partial(_text_features, model))
    self._image_forward = jax.jit(functools.partial(
        _image_features, model, self._image_size, self._mean, self._std))

  @classmethod
  def load(cls, path_or_name: str, local_files_only: bool = False) -> "ClipEncoder":
    """Loads model, tokenizer and image normalisation from a directory or a hub name.

    Args:
      path_or_name: a directory (as written by `save_pretrained`) or a hub model name
        ("owner/name"); anything that looks like a path must be a directory.
      local_files_only: never download; a hub name must then be in the local cache.
    """
    path_or_name = str(path_or_name)
    if not os.path.isdir(path_or_name) and (
        os.path.exists(path_or_name) or os.path.isabs(path_or_name)
        or path_or_name.startswith(".") or path_or_name.count("/") > 1):
      raise errors.MissingError(f"no model directory at {path_or_name}")
    model, params = text.load_flax_model(transformers.FlaxCLIPModel, path_or_name,
                                         local_files_only)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path_or_name, local_files_only=local_files_only)
    mean, std = _image_normalisation(path_or_name, local_files_only)
    return cls(model, params, tokenizer, mean, std)

  @property
  def dim(self) -> int:
    """The embedding dimension (the model's `projection_dim`)."""
    return self._dim

  @property
  def max_length(self) -> int:
    """Token count (with start and end tokens) beyond which captions are truncated."""
    return self._max_length

  @property
  def image_size(self) -> int:
    """The side, in pixels, that images are resized to."""
    return self._image_size

  def token_lengths(self, captions: Sequence[str]) -> list[int]:
    """Tokens of each caption (with the special tokens), untruncated: > max_length is cut."""
    return text.count_tokens(self._tokenizer, captions)

  def encode_text(self, captions: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  center: Optional[np.ndarray] = None) -> np.ndarray:
    """Embeds captions as unit rows, float32 of shape (len(captions), dim), in input order.

    Args:
      captions: non-empty sequence of str.
      batch_size: rows per forward pass; results do not depend on it beyond float rounding.
      center: optional (dim,) vector, usually from `fit_center`; each row e becomes
        normalise(e - center).
    """
    return text.embed_captions(self._tokenizer, self._text_forward, self._params, captions,
                               batch_size, self._max_length, self._dim, center, self._pad_id)

  def fit_center(self, captions: Sequence[str],
                 batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """The mean of the unit embeddings of `captions`, float32 (dim,), for `encode_text(center=)`."""
    return self.encode_text(captions, batch_size).mean(axis=0).astype(np.float32)

  def encode_images(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Embeds uint8 images (n, H, W, C), C in {1, 3}, as unit float32 rows (n, dim)."""
    images = _check_images(images)
    batch_size = text.check_batch_size(batch_size)
    images = _center_square(images)
    rows = text.padded_rows(len(images), batch_size)
    out = np.empty((len(images), self._dim), np.float32)
    for part in text.batch_slices(len(images), rows):
      with jax.default_matmul_precision("highest"):
        emb = self._image_forward(self._params, text.pad_to_rows(images[part], rows))
      out[part] = np.asarray(emb)[:part.stop - part.start]
    return out


def _image_normalisation(path_or_name: str,
                         local_files_only: bool) -> tuple[Sequence[float], Sequence[float]]:
  """`image_mean` and `image_std` of the checkpoint's preprocessor config, else CLIP's."""
  config_file = transformers.utils.cached_file(
      path_or_name, "preprocessor_config.json", local_files_only=local_files_only,
      _raise_exceptions_for_missing_entries=False)
  if config_file is None:
    return CLIP_MEAN, CLIP_STD
  with open(config_file, encoding="utf-8") as f:
    config = json.load(f)
  return config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)


def _check_images(images: np.ndarray) -> np.ndarray:
  """`images` after checking it is a non-empty uint8 array (n, H, W, C) with C in {1, 3}."""
  if not isinstance(images, np.ndarray):
    raise errors.WrongTypeError(f"images must be a numpy array, got {type(images).__name__}")
  if images.dtype != np.uint8:
    raise errors.WrongTypeError(f"images must be uint8, got {images.dtype}")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.InputError(
        f"images must have shape (n, H, W, C) with C = 1 or 3, got {images.shape}; add a trailing "
        "axis to grayscale images")
  if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
    raise errors.InputError(f"images is empty: shape {images.shape}")
  return images


def _center_square(images: np.ndarray) -> np.ndarray:
  """The centred square crop (side min(H, W)) of each image."""
  h, w = images.shape[1:3]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return images[:, top:top + side, left:left + side]


def _text_features(model: transformers.FlaxCLIPModel, params, input_ids: jax.Array,
                   attention_mask: jax.Array) -> jax.Array:
  """Unit-norm projected text features at the end-of-text token, (B, projection_dim)."""
  features = model.get_text_features(input_ids, attention_mask, params=params, train=False)
  return text.l2_normalize(features)


def _image_features(model: transformers.FlaxCLIPModel, image_size: int,
                    mean: tuple[float, ...], std: tuple[float, ...], params,
                    images: jax.Array) -> jax.Array:
  """Unit-norm projected image features of square uint8 images (B, S, S, C), (B, dim)."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), method="bicubic")
  x = (jnp.clip(x, 0.0, 255.0) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
  pixel_values = jnp.transpose(x, (0, 3, 1, 2))  # FlaxCLIPModel takes NCHW
  return text.l2_normalize(model.get_image_features(pixel_values, params=params, train=False))
