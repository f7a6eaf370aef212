"""A dataset split as the rest of the project sees it: random access to records by position.

Every source (the offline default's, tensorflow-datasets') returns records in one format:

  image    (n, R, R, C) uint8, already at the configured resolution R (C = 1 grayscale, 3 RGB)
  label    (n,) int32 class index into `class_names` (-1 where the dataset has no classes)
  caption  (n,) numpy object array of str
  id       (n,) uint32 record id: stable across runs and machines, unique within the split

Record ids, not positions, identify a record to the embedding store and to the Poisson subsample
(retrieval/subsample.py), so a source must give the same record the same id on every read.
"""

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from dprdm_jax import errors

FIELDS = ("image", "label", "caption", "id")


class SourceError(errors.InputError):
  """A dataset is missing, malformed, or asked for something it does not have."""


class Source(Protocol):
  """Random access to one split of one dataset."""

  name: str
  class_names: tuple[str, ...]
  resolution: int
  channels: int
  ids: np.ndarray  # (n,) uint32: the id of the record at each position

  def __len__(self) -> int:
    ...

  def read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The records at `positions` (any order, repeats allowed), in the format above."""


def check_positions(positions, size: int) -> np.ndarray:
  """Positions as an int64 vector; SourceError when one lies outside [0, size)."""
  positions = np.asarray(positions)
  if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
    raise SourceError(f"positions must be a 1-D integer array, got {positions.dtype} "
                      f"of shape {positions.shape}")
  if positions.size and (positions.min() < 0 or positions.max() >= size):
    raise SourceError(f"positions must lie in [0, {size}), got {positions.min()}.."
                      f"{positions.max()}")
  return positions.astype(np.int64)


def pad_to(images: np.ndarray, resolution: int) -> np.ndarray:
  """(n, h, w, C) images zero-padded, centred, to (n, R, R, C); SourceError if larger than R."""
  _, h, w, _ = images.shape
  if h > resolution or w > resolution:
    raise SourceError(f"images are {h}x{w}, larger than the resolution {resolution}; pad only "
                      "grows images")
  top, left = (resolution - h) // 2, (resolution - w) // 2
  return np.pad(images, ((0, 0), (top, resolution - h - top), (left, resolution - w - left),
                         (0, 0)))


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A split held in memory: images at the target resolution, labels, captions, ids."""

  name: str
  class_names: tuple[str, ...]
  images: np.ndarray
  labels: np.ndarray
  captions: np.ndarray
  ids: np.ndarray

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.dtype != np.uint8 or (
        self.images.shape[1] != self.images.shape[2]):
      raise SourceError(f"{self.name}: images must be (n, R, R, C) uint8, got "
                        f"{self.images.dtype} {self.images.shape}")
    for field, value in (("labels", self.labels), ("captions", self.captions),
                         ("ids", self.ids)):
      if value.shape != (n,):
        raise SourceError(f"{self.name}: {field} must have shape ({n},), got {value.shape}")
    if len(np.unique(self.ids)) != n:
      raise SourceError(f"{self.name}: record ids are not unique")

  @property
  def resolution(self) -> int:
    return self.images.shape[1]

  @property
  def channels(self) -> int:
    return self.images.shape[3]

  def __len__(self) -> int:
    return len(self.images)

  def read(self, positions) -> dict[str, np.ndarray]:
    positions = check_positions(positions, len(self))
    return dict(image=self.images[positions], label=self.labels[positions].astype(np.int32),
                caption=self.captions[positions], id=self.ids[positions].astype(np.uint32))


def concatenate(name: str, sources: Sequence[ArraySource],
                id_spans: Sequence[int]) -> ArraySource:
  """One source of several with disjoint class sets; labels are offset, ids re-based per part.

  Part j's ids lie in [0, id_spans[j]) and become id + sum(id_spans[:j]): the same record gets
  the same id in every split and every run, as long as the parts are joined in the same order.
  """
  if len({(s.resolution, s.channels) for s in sources}) != 1:
    raise SourceError(f"{name}: parts differ in resolution or channels")
  if len(id_spans) != len(sources):
    raise SourceError(f"{name}: {len(id_spans)} id spans for {len(sources)} parts")
  labels, ids, class_names = [], [], []
  label_offset = id_offset = 0
  for s, span in zip(sources, id_spans):
    if len(s) and int(s.ids.max()) >= span:
      raise SourceError(f"{name}: part {s.name} has id {int(s.ids.max())} outside its span {span}")
    labels.append(np.where(s.labels >= 0, s.labels + label_offset, -1))
    ids.append(s.ids.astype(np.int64) + id_offset)
    class_names.extend(s.class_names)
    label_offset += len(s.class_names)
    id_offset += span
  if id_offset > 2**32:
    raise SourceError(f"{name}: joined record ids exceed 32 bits")
  return ArraySource(
      name=name, class_names=tuple(class_names),
      images=np.concatenate([s.images for s in sources]),
      labels=np.concatenate(labels).astype(np.int32),
      captions=np.concatenate([s.captions for s in sources]),
      ids=np.concatenate(ids).astype(np.uint32))
