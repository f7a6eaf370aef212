"""Clothing emoji: public images of the private domain's concepts, in another style.

The paper's public data covers its private domains' concepts (LAION holds photos of the things
CIFAR and ImageNet show); digits and animal silhouettes hold nothing like a garment, so a model
trained on them alone has no shapes to draw clothing with. These 30 clothing emoji are that
cover for the offline default: garments, shoes and bags drawn by two emoji sets, the Noto Color
Emoji font and the gemojione PNGs, from the Debian packages `fonts-noto-color-emoji` and
`ruby-gemojione` (`launch/local.sh` extracts both into the virtual environment with
`apt-get download` and `dpkg -x`; ruby is never installed or run).

Each emoji becomes a white-on-black 28x28 grayscale image (luminance times opacity, the item's
99th-percentile brightness set to 1), like the other offline sets, and VARIANTS augmented copies
of it: scale, aspect, a small rotation, a mirror image, brightness, gamma and position, drawn
from a generator seeded by the record's position, so every run builds the same images.

Records are ordered by class, then by emoji set (Noto, then gemojione where it has the emoji),
then by variant; the offline convention position % 10 == 9 makes the test split (10%), so every
(class, set) pair has VARIANTS / 10 test images.
"""

import functools
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dprdm_jax.data import source as source_lib

# (code point, its Unicode CLDR short name); captions read "a t-shirt emoji".
CLASSES = (
    ("1F455", "t-shirt"), ("1F456", "jeans"), ("1F457", "dress"), ("1F45A", "woman's clothes"),
    ("1F458", "kimono"), ("1F9E5", "coat"), ("1F97C", "lab coat"), ("1F9E6", "socks"),
    ("1F9E3", "scarf"), ("1F9E4", "gloves"), ("1FA73", "shorts"), ("1F459", "bikini"),
    ("1FA71", "one-piece swimsuit"), ("1F454", "necktie"), ("1F3BD", "running shirt"),
    ("1F45F", "running shoe"), ("1F45E", "man's shoe"), ("1F460", "high-heeled shoe"),
    ("1F461", "woman's sandal"), ("1F462", "woman's boot"), ("1F97E", "hiking boot"),
    ("1F97F", "flat shoe"), ("1F45C", "handbag"), ("1F45B", "purse"), ("1F45D", "clutch bag"),
    ("1F4BC", "briefcase"), ("1F392", "backpack"), ("1F6CD", "shopping bags"),
    ("1F9BA", "safety vest"), ("1F452", "woman's hat"))
NAMES = tuple(name for _, name in CLASSES)
VARIANTS = 60
_SIDE = 28
_SEED = 0x3E0D1  # fixed: the variants are part of the dataset's definition

# Where the two packages' files are found: extracted into the virtual environment by
# launch/local.sh, or installed system-wide by apt.
ROOTS = (pathlib.Path(sys.prefix) / "share" / "dprdm-data", pathlib.Path("/"))
_NOTO = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_GEMOJIONE = "usr/share/rubygems-integration/all/gems/gemojione-*/assets/png"


def _find(pattern: str, package: str) -> pathlib.Path:
  for root in ROOTS:
    found = sorted(root.glob(pattern))
    if found:
      return found[-1]
  raise source_lib.SourceError(
      f"the Debian package {package!r} was not found under {', '.join(map(str, ROOTS))}; "
      "`bash launch/local.sh` extracts it into the virtual environment")


def _drawings() -> list[tuple[int, Image.Image]]:
  """(label, RGBA drawing) per (class, emoji set), in record order."""
  font = ImageFont.truetype(str(_find(_NOTO, "fonts-noto-color-emoji")), 109)  # its one size
  png_dir = _find(_GEMOJIONE, "ruby-gemojione")
  drawings = []
  for label, (code, name) in enumerate(CLASSES):
    canvas = Image.new("RGBA", (160, 160))
    ImageDraw.Draw(canvas).text((8, 8), chr(int(code, 16)), font=font, embedded_color=True)
    if canvas.getbbox() is None:
      raise source_lib.SourceError(f"the Noto font draws nothing for U+{code} ({name})")
    drawings.append((label, _shrink(canvas)))
    png = png_dir / f"{code}.png"
    if png.is_file():
      with Image.open(png) as image:
        drawings.append((label, _shrink(image.convert("RGBA"))))
  return drawings


def _shrink(image: Image.Image) -> Image.Image:
  """The drawing cropped to its content, at most 64 pixels on a side (over twice the output's)."""
  image = image.crop(image.getbbox())
  image.thumbnail((64, 64), Image.LANCZOS)
  return image


def _variant(drawing: Image.Image, rng: np.random.Generator) -> np.ndarray:
  """One augmented 28x28 uint8 white-on-black image of an RGBA drawing (at most 64 pixels)."""
  drawing = drawing.rotate(rng.uniform(-10, 10), Image.BICUBIC, expand=True)
  drawing = drawing.crop(drawing.getbbox())
  if rng.random() < 0.5:
    drawing = drawing.transpose(Image.FLIP_LEFT_RIGHT)
  w, h = drawing.size
  aspect = np.exp(rng.uniform(-0.1, 0.1))
  scale = rng.uniform(20, _SIDE) / max(w * aspect, h)
  size = (max(1, min(_SIDE, round(w * aspect * scale))), max(1, min(_SIDE, round(h * scale))))
  rgba = np.asarray(drawing.resize(size, Image.LANCZOS), np.float32) / 255
  gray = np.clip(rgba[..., :3] @ np.float32([0.299, 0.587, 0.114]) * rgba[..., 3], 0, 1)
  inside = gray > 0.05
  peak = np.percentile(gray[inside], 99) if inside.any() else 1.0
  gray = np.clip(gray / max(peak, 1e-3), 0, 1) ** np.exp(rng.uniform(-0.3, 0.3))
  gray *= rng.uniform(0.65, 1.0)
  out = np.zeros((_SIDE, _SIDE), np.float32)
  y = rng.integers(0, _SIDE - size[1] + 1)
  x = rng.integers(0, _SIDE - size[0] + 1)
  out[y:y + size[1], x:x + size[0]] = gray
  return np.round(out * 255).astype(np.uint8)


@functools.cache
def raw() -> tuple[np.ndarray, np.ndarray]:
  """All (images (n, 28, 28) uint8, labels (n,)) in record order, cached per process."""
  images, labels = [], []
  for label, drawing in _drawings():
    for _ in range(VARIANTS):
      rng = np.random.default_rng([_SEED, len(images)])
      images.append(_variant(drawing, rng))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int64)
