"""A Source over a prepared tensorflow-datasets split, read without TensorFlow.

tensorflow-datasets reads a split prepared in the ArrayRecord format by random access
(`as_data_source`): records are parsed from their protos with NumPy and images decoded with PIL,
so no TensorFlow is imported. The builder is restored from the prepared directory's own metadata
(`dataset_info.json`, `features.json`, label files) rather than from the dataset's generation code,
because that code needs TensorFlow for some datasets (coco_captions declares `tf.int64` features).
Preparing a dataset (downloading and writing the ArrayRecord files) does need TensorFlow and the
internet, so it happens elsewhere: see `TfdsSource`.

Per dataset:

  cifar10        32x32 RGB, labels into the 10 class names stored with the dataset; the caption is
                 the DP-RDM prompt "a {class}, high quality photograph", with "an" before a class
                 name that starts with a vowel letter ("an airplane, ...", "an automobile, ...").
  coco_captions  the 2014 images in the Karpathy and Li splits (train, val, test, restval),
                 label -1, no class names; each image has several captions and the first one
                 stored (the order of the Karpathy annotation file) is its caption.
  imagenet2012   ILSVRC 2012 (train, validation; test has label -1), the paper's public data.
                 tensorflow-datasets names its classes by WordNet id only ("n01440764"), and
                 that id is the caption: the real-data configs search the public set by its
                 CLIP image embeddings (config.embed.key = "image"), so no caption is read as text.

Record ids are positions within the split as requested (e.g. "train", or "train[:1000]"). The
dataset version is pinned and tensorflow-datasets writes a version's records in a deterministic
order (examples are shuffled by a hash of their keys when prepared), so a position names the same
record on every run and machine that reads the same prepared files. COCO's own image ids would fit
32 bits, but positions are used for both datasets so every id is unique and dense.

Images are centre-cropped to a square (the shorter side) and resized to the configured resolution
with PIL's bicubic filter, which widens its support when shrinking, so downscaling is antialiased.
Large reductions first shrink by a whole factor with a box filter down to no less than 3x the target
(PIL's reducing_gap=3, which PIL documents as indistinguishable from the bicubic filter alone in
most cases), about halving the resize time of a COCO image. Grayscale images are repeated to 3
channels and a fourth channel (alpha) is dropped.
"""

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from dprdm_jax.data import source

_PREPARE_HINT = (
    "Prepare it on a machine with internet access and TensorFlow, in the ArrayRecord format "
    "(random access needs it):\n  tfds build {builder} --file_format=array_record "
    "--data_dir=DIR\nthen copy DIR/{path} to the same path under this data_dir. A copy prepared "
    "as TFRecord can be converted there with `tfds convert_format --out_file_format=array_record`.")


def _article(noun: str) -> str:
  return "an" if noun[:1].lower() in "aeiou" else "a"


def _class_prompt(example: dict[str, Any], class_names: tuple[str, ...]) -> str:
  noun = class_names[int(example["label"])].replace("_", " ")
  return f"{_article(noun)} {noun}, high quality photograph"


def _wordnet_id(example: dict[str, Any], class_names: tuple[str, ...]) -> str:
  label = int(example["label"])
  return class_names[label] if label >= 0 else "unlabelled"


def _first_caption(example: dict[str, Any], class_names: tuple[str, ...]) -> str:
  del class_names  # coco_captions has no classes.
  texts = example["captions"]["text"]
  if np.size(texts) == 0:
    raise source.SourceError("a coco_captions record has no captions")
  text = texts[0]
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """How one supported dataset is found on disk and turned into records."""

  builder: str
  config: str | None
  version: str
  has_labels: bool
  caption: Callable[[dict[str, Any], tuple[str, ...]], str]

  @property
  def build_name(self) -> str:
    """The name `tfds build` takes: builder/config."""
    return "/".join(p for p in (self.builder, self.config) if p)

  @property
  def path(self) -> str:
    """The prepared directory relative to data_dir."""
    return f"{self.build_name}/{self.version}"

  def prepare_hint(self) -> str:
    return _PREPARE_HINT.format(builder=self.build_name, path=self.path)


DATASETS = {
    "cifar10": _Dataset("cifar10", None, "3.0.2", True, _class_prompt),
    "coco_captions": _Dataset("coco_captions", "2014", "1.1.0", False, _first_caption),
    "imagenet2012": _Dataset("imagenet2012", None, "5.1.0", True, _wordnet_id),
}


def _to_square_rgb(image: np.ndarray, resolution: int) -> np.ndarray:
  """(h, w[, C]) uint8 image as (R, R, 3): centre crop to a square, then resize."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  image = image[:, :, :3]
  h, w, _ = image.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  image = image[top:top + side, left:left + side]
  if side == resolution:
    return image
  resized = Image.fromarray(np.ascontiguousarray(image)).resize(
      (resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
  return np.asarray(resized)


class TfdsSource:
  """One split of a supported tensorflow-datasets dataset (see DATASETS), prepared in data_dir.

  Reads decode and resize records on a pool of threads: ArrayRecord readers are thread-safe, and
  PIL releases the interpreter lock while decoding and resizing.
  """

  channels = 3

  def __init__(self, name: str, split: str, resolution: int, data_dir: str | None = None):
    """Opens the split; SourceError if the dataset is unsupported, not prepared, or lacks it.

    Args:
      name: a key of DATASETS.
      split: a tensorflow-datasets split, e.g. "train", "test" or "train[:1000]".
      resolution: side R of the square images returned.
      data_dir: the directory holding prepared datasets; None for tensorflow-datasets' default
        (TFDS_DATA_DIR, else ~/tensorflow_datasets).
    """
    if name not in DATASETS:
      raise source.SourceError(f"unsupported tensorflow-datasets dataset {name!r}; supported: "
                               f"{', '.join(sorted(DATASETS))}")
    if resolution < 1:
      raise source.SourceError(f"resolution must be positive, got {resolution}")
    self._dataset = dataset = DATASETS[name]
    self.name = name
    self.split = split
    self.resolution = resolution
    try:
      builder = read_only_builder.builder_from_files(
          dataset.builder, config=dataset.config, version=dataset.version, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      raise source.SourceError(
          f"{name} {dataset.version} is not prepared in {data_dir or 'the default data_dir'} "
          f"({e})\n" + dataset.prepare_hint()) from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise source.SourceError(
          f"{name} in {builder.data_dir} is prepared as {builder.info.file_format.value}, which "
          "has no random access.\n" + dataset.prepare_hint())
    try:
      self._records = builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
      raise source.SourceError(f"{name} has no split {split!r}; it has "
                               f"{', '.join(builder.info.splits)} ({e})") from e
    self.class_names = (tuple(builder.info.features["label"].names) if dataset.has_labels
                        else ())
    self._size = len(self._records)
    if self._size > 2**32:
      raise source.SourceError(f"{name} {split} has {self._size} records; ids are 32-bit")
    self._workers = max(1, min(16, os.cpu_count() or 1))

  def __len__(self) -> int:
    return self._size

  @property
  def ids(self) -> np.ndarray:
    return np.arange(self._size, dtype=np.uint32)

  def _record(self, position: int) -> tuple[np.ndarray, int, str]:
    example = self._records[position]
    label = int(example["label"]) if self._dataset.has_labels else -1
    return (_to_square_rgb(example["image"], self.resolution), label,
            self._dataset.caption(example, self.class_names))

  def read(self, positions) -> dict[str, np.ndarray]:
    """The records at `positions` (any order, repeats allowed), in the format of source.py."""
    positions = source.check_positions(positions, len(self))
    n, r = len(positions), self.resolution
    images = np.empty((n, r, r, self.channels), np.uint8)
    labels = np.empty((n,), np.int32)
    captions = np.empty((n,), object)
    with concurrent.futures.ThreadPoolExecutor(min(self._workers, max(n, 1))) as pool:
      for i, (image, label, caption) in enumerate(pool.map(self._record, positions.tolist())):
        images[i], labels[i], captions[i] = image, label, caption
    return dict(image=images, label=labels, caption=captions, id=positions.astype(np.uint32))
