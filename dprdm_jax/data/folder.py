"""A Source over a folder of image files: a private set brought as pictures (`folder:PATH`).

`dprdm embed --dataset folder:PATH` (embed.open_source) reads PATH with `FolderSource`:

  images    every file under PATH, subfolders included, whose name ends in .png, .jpg or .jpeg
            (any letter case); files and folders whose names start with "." are skipped.
  ids       the images sorted by their path relative to PATH, written with "/" (Python's string
            order, by Unicode code point: the same on every machine, file system and locale); a
            record's id is its position in that order. The same files get the same ids on every
            run and machine; adding or removing a file renumbers the files after it (a changed
            folder is, like any changed data, a new store with a new fingerprint and budget).
  captions  from PATH/captions.jsonl, one {"file": RELATIVE_PATH, "caption": TEXT} per line, or
            PATH/captions.txt, one "RELATIVE_PATH<TAB>CAPTION" per line; blank lines are skipped,
            and the file must name every image exactly once and nothing else. Without either, a
            file's stem with underscores read as spaces ("red_dress_02.png" -> "red dress 02").
  pixels    decoded with PIL, turned by its EXIF orientation, transparent pixels set over black
            (the offline data's background), converted to grayscale (1 channel) or RGB (3),
            centre-cropped to a square and resized to the resolution as tfds_source.py does
            (bicubic, antialiased when shrinking).
  labels    -1: a folder has no classes.

A folder is one split, "train". Files are read when their records are (`read`), on a pool of
threads; a file PIL cannot decode raises SourceError naming it.
"""

import concurrent.futures
import json
import os
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageOps

from dprdm_jax.data import source

EXTENSIONS = (".png", ".jpg", ".jpeg")
CAPTION_FILES = ("captions.jsonl", "captions.txt")
SPLIT = "train"
_MODES = {1: "L", 3: "RGB"}


def list_images(directory: pathlib.Path) -> list[str]:
  """The relative "/"-separated paths of the images under `directory`, sorted (module docstring)."""
  found = []
  for root, folders, files in os.walk(directory):
    folders[:] = [f for f in folders if not f.startswith(".")]
    relative = pathlib.Path(root).relative_to(directory)
    found.extend((relative / f).as_posix() for f in files
                 if not f.startswith(".") and f.lower().endswith(EXTENSIONS))
  return sorted(found)


def _stem_caption(relative: str) -> str:
  stem = pathlib.PurePosixPath(relative).stem
  return " ".join(stem.replace("_", " ").split()) or stem


def _caption_lines(path: pathlib.Path):
  """(line number, text) of each non-blank line of a UTF-8 captions file."""
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise source.SourceError(f"{path} is not UTF-8 text (byte {e.start})") from None
  except OSError as e:
    raise source.SourceError(f"cannot read {path}: {e}") from None
  return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_entry(path: pathlib.Path, number: int, line: str) -> tuple[str, str]:
  if path.suffix == ".jsonl":
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise source.SourceError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and isinstance(entry.get("caption"), str)):
      raise source.SourceError(f'{path}:{number}: expected {{"file": "...", "caption": "..."}}')
    name, caption = entry["file"], entry["caption"]
  else:
    name, tab, caption = line.partition("\t")
    if not tab:
      raise source.SourceError(f"{path}:{number}: expected FILE<TAB>CAPTION")
  if not caption.strip():
    raise source.SourceError(f"{path}:{number}: the caption of {name!r} is blank")
  return name, caption.strip()


def read_captions(directory: pathlib.Path, names: list[str]) -> list[str]:
  """The caption of each image in `names`: from the folder's captions file, or from the stems.

  SourceError if both captions files exist, or the one there is unreadable, malformed, names a
  file twice, names a file that is not one of the images, or leaves an image out.
  """
  present = [directory / f for f in CAPTION_FILES if (directory / f).is_file()]
  if not present:
    return [_stem_caption(n) for n in names]
  if len(present) > 1:
    raise source.SourceError(f"{directory} holds both {' and '.join(CAPTION_FILES)}; keep one")
  (path,) = present
  captions, images = {}, set(names)
  for number, line in _caption_lines(path):
    name, caption = _parse_entry(path, number, line)
    if name in captions:
      raise source.SourceError(f"{path}:{number}: {name!r} is named twice")
    if name not in images:
      raise source.SourceError(f"{path}:{number}: {name!r} is not an image of {directory}")
    captions[name] = caption
  missing = [n for n in names if n not in captions]
  if missing:
    raise source.SourceError(f"{path} gives no caption for {len(missing)} image(s), e.g. "
                             f"{missing[0]!r}")
  return [captions[n] for n in names]


def load_image(path: pathlib.Path, resolution: int, channels: int) -> np.ndarray:
  """One image file as (R, R, C) uint8 (module docstring); SourceError if PIL cannot read it."""
  try:
    with Image.open(path) as opened:
      image = ImageOps.exif_transpose(opened).convert("RGBA")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise source.SourceError(f"{path}: not a readable PNG or JPEG image ({e})") from None
  image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image)
  image = image.convert(_MODES[channels])
  side = min(image.size)
  left, top = (image.width - side) // 2, (image.height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  if side != resolution:
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
  return np.asarray(image, np.uint8).reshape(resolution, resolution, channels)


class FolderSource:
  """The images of one folder as the split "train" (module docstring)."""

  class_names = ()

  def __init__(self, directory, split: str, resolution: int, channels: int):
    """Lists the images and reads the captions; SourceError if the folder cannot serve.

    Args:
      directory: the folder.
      split: must be "train" (a folder is one split).
      resolution: side R of the square images returned.
      channels: 1 (grayscale) or 3 (RGB).
    """
    self.directory = pathlib.Path(directory)
    if split != SPLIT:
      raise source.SourceError(f"a folder of images is one split, {SPLIT!r}; got {split!r}")
    if resolution < 1:
      raise source.SourceError(f"resolution must be positive, got {resolution}")
    if channels not in _MODES:
      raise source.SourceError(f"channels must be 1 or 3, got {channels}")
    if not self.directory.is_dir():
      raise source.SourceError(f"{self.directory} is not a folder")
    self.files = list_images(self.directory)
    if not self.files:
      raise source.SourceError(f"{self.directory} holds no {', '.join(EXTENSIONS)} images")
    if len(self.files) > 2**32:
      raise source.SourceError(f"{self.directory} holds {len(self.files)} images; ids are 32-bit")
    self.captions = np.array(read_captions(self.directory, self.files), dtype=object)
    self.name = f"folder:{self.directory.name}/{split}"
    self.resolution, self.channels = resolution, channels
    self._workers = max(1, min(16, os.cpu_count() or 1))

  def __len__(self) -> int:
    return len(self.files)

  @property
  def ids(self) -> np.ndarray:
    return np.arange(len(self.files), dtype=np.uint32)

  def _image(self, position: int) -> np.ndarray:
    return load_image(self.directory / self.files[position], self.resolution, self.channels)

  def read(self, positions) -> dict[str, np.ndarray]:
    """The records at `positions` (any order, repeats allowed), in the format of source.py."""
    positions = source.check_positions(positions, len(self))
    n, r = len(positions), self.resolution
    images = np.empty((n, r, r, self.channels), np.uint8)
    with concurrent.futures.ThreadPoolExecutor(min(self._workers, max(n, 1))) as pool:
      for i, image in enumerate(pool.map(self._image, positions.tolist())):
        images[i] = image
    return dict(image=images, label=np.full((n,), -1, np.int32),
                caption=self.captions[positions], id=positions.astype(np.uint32))
