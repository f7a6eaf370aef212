"""FolderSource: a folder of PNG and JPEG files as a Source: ids, captions, pixels, errors."""

import json

import numpy as np
from PIL import Image
import pytest

from dprdm_jax import config_lib
from dprdm_jax import embed
from dprdm_jax.data import folder
from dprdm_jax.data import source as source_lib


def _write(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)
  return path


def _folder(root):
  """Five images (PNG and JPEG, grayscale, RGB, RGBA, palette, any size), in subfolders too, and
  files that are not images or are hidden."""
  _write(root / "red_dress_02.png", Image.new("RGB", (40, 30), (200, 0, 0)))
  _write(root / "b" / "boot.JPG", Image.new("L", (20, 20), 90))
  _write(root / "a.jpeg", Image.new("RGB", (64, 64), (0, 0, 255)))
  _write(root / "b" / "c" / "sky.png", Image.new("RGBA", (8, 16), (0, 255, 0, 255)))
  _write(root / "Zebra.png", Image.new("P", (32, 32), 3))
  _write(root / ".hidden.png", Image.new("L", (8, 8), 1))
  _write(root / ".cache" / "x.png", Image.new("L", (8, 8), 1))
  (root / "notes.md").write_text("not an image")
  return root


ORDER = ["Zebra.png", "a.jpeg", "b/boot.JPG", "b/c/sky.png", "red_dress_02.png"]


@pytest.mark.parametrize("channels", [1, 3])
def test_images_sorted_by_relative_name_at_the_resolution_and_channels(tmp_path, channels):
  source = folder.FolderSource(_folder(tmp_path / "pics"), "train", 16, channels)
  assert source.files == ORDER and len(source) == 5
  assert source.name == "folder:pics/train" and source.class_names == ()
  assert (source.resolution, source.channels) == (16, channels)
  np.testing.assert_array_equal(source.ids, np.arange(5))
  batch = source.read(np.array([4, 0, 4]))
  assert batch["image"].shape == (3, 16, 16, channels) and batch["image"].dtype == np.uint8
  assert batch["id"].tolist() == [4, 0, 4] and batch["id"].dtype == np.uint32
  assert batch["label"].tolist() == [-1, -1, -1] and batch["label"].dtype == np.int32
  assert list(batch["caption"]) == ["red dress 02", "Zebra", "red dress 02"]
  everything = source.read(np.arange(5))
  assert list(everything["caption"]) == ["Zebra", "a", "boot", "sky", "red dress 02"]
  if channels == 3:  # solid colours stay solid after the crop and resize
    np.testing.assert_array_equal(everything["image"][4], np.full((16, 16, 3), (200, 0, 0)))
    np.testing.assert_array_equal(everything["image"][3], np.full((16, 16, 3), (0, 255, 0)))
    assert (np.abs(everything["image"][1].astype(int) - (0, 0, 255)) <= 2).all()  # JPEG
  else:
    assert (np.abs(everything["image"][2].astype(int) - 90) <= 2).all()


def test_ids_and_pixels_do_not_depend_on_the_order_files_were_written(tmp_path):
  first = folder.FolderSource(_folder(tmp_path / "one"), "train", 8, 1)
  second_root = tmp_path / "two"
  for name in reversed(ORDER):  # same files, written in the opposite order
    _write(second_root / name, Image.open(tmp_path / "one" / name))
  second = folder.FolderSource(second_root, "train", 8, 1)
  assert second.files == first.files
  a, b = first.read(np.arange(5)), second.read(np.arange(5))
  for field in ("id", "caption", "image"):
    np.testing.assert_array_equal(a[field], b[field])


def test_centre_crop_exif_orientation_and_transparency(tmp_path):
  # 96x64: a white 64x64 centre between black 16-pixel sides; the crop keeps only the white.
  wide = Image.new("L", (96, 64), 0)
  wide.paste(255, (16, 0, 80, 64))
  _write(tmp_path / "f" / "a_wide.png", wide)
  # 64x32, left half white, with EXIF orientation 6 (shown turned 90 degrees clockwise, 32x64,
  # white on top): the crop of the shown image is white above, black below.
  turned = Image.new("L", (64, 32), 0)
  turned.paste(255, (0, 0, 32, 32))
  exif = Image.Exif()
  exif[0x0112] = 6
  turned.save(tmp_path / "f" / "b_turned.png", exif=exif)
  # Fully transparent white pixels become black; opaque ones keep their value.
  clear = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
  clear.paste((255, 255, 255, 255), (0, 0, 16, 8))
  _write(tmp_path / "f" / "c_clear.png", clear)
  images = folder.FolderSource(tmp_path / "f", "train", 16, 1).read(np.arange(3))["image"][..., 0]
  np.testing.assert_array_equal(images[0], np.full((16, 16), 255))
  assert (images[1][:6] == 255).all() and (images[1][10:] == 0).all()
  assert (images[2][:8] == 255).all() and (images[2][8:] == 0).all()


def test_captions_from_a_txt_or_jsonl_file(tmp_path):
  root = _folder(tmp_path / "pics")
  (root / "captions.txt").write_text(
      "".join(f"{name}\tcaption {i}\n\n" for i, name in enumerate(reversed(ORDER))))
  source = folder.FolderSource(root, "train", 8, 1)
  assert list(source.read(np.arange(5))["caption"]) == [f"caption {4 - i}" for i in range(5)]
  (root / "captions.txt").unlink()
  (root / "captions.jsonl").write_text("".join(
      json.dumps({"file": name, "caption": f" {name.upper()} "}) + "\n" for name in ORDER))
  assert list(folder.FolderSource(root, "train", 8, 1).captions) == [n.upper() for n in ORDER]


@pytest.mark.parametrize("name,text,message", [
    ("captions.txt", "Zebra.png\tone\nZebra.png\ttwo\n", "named twice"),
    ("captions.txt", "Zebra.png\tone\nmissing.png\ttwo\n", "not an image of"),
    ("captions.txt", "Zebra.png\tone\n", r"no caption for 4 image\(s\), e.g. 'a.jpeg'"),
    ("captions.txt", "Zebra.png one\n", "expected FILE<TAB>CAPTION"),
    ("captions.txt", "Zebra.png\t  \n", "blank"),
    ("captions.jsonl", '{"file": "Zebra.png"}\n', "expected"),
    ("captions.jsonl", "Zebra.png\tone\n", "not JSON"),
])
def test_bad_captions_files_are_refused(tmp_path, name, text, message):
  root = _folder(tmp_path / "pics")
  (root / name).write_text(text)
  with pytest.raises(source_lib.SourceError, match=message):
    folder.FolderSource(root, "train", 8, 1)


def test_two_captions_files_or_a_non_utf8_one_are_refused(tmp_path):
  root = _folder(tmp_path / "pics")
  (root / "captions.txt").write_bytes(b"Zebra.png\t\xff\n")
  with pytest.raises(source_lib.SourceError, match="not UTF-8"):
    folder.FolderSource(root, "train", 8, 1)
  (root / "captions.jsonl").write_text("")
  with pytest.raises(source_lib.SourceError, match="keep one"):
    folder.FolderSource(root, "train", 8, 1)


def test_empty_missing_and_misused_folders_are_refused(tmp_path):
  (tmp_path / "empty" / ".hidden").mkdir(parents=True)
  _write(tmp_path / "empty" / ".hidden" / "a.png", Image.new("L", (4, 4)))
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(source_lib.SourceError, match="holds no .png, .jpg, .jpeg images"):
    folder.FolderSource(tmp_path / "empty", "train", 8, 1)
  with pytest.raises(source_lib.SourceError, match="is not a folder"):
    folder.FolderSource(tmp_path / "nowhere", "train", 8, 1)
  root = _folder(tmp_path / "pics")
  for split, resolution, channels, message in (("test", 8, 1, "one split"),
                                               ("train", 0, 1, "resolution"),
                                               ("train", 8, 2, "channels must be 1 or 3")):
    with pytest.raises(source_lib.SourceError, match=message):
      folder.FolderSource(root, split, resolution, channels)
  with pytest.raises(source_lib.SourceError, match="positions"):
    folder.FolderSource(root, "train", 8, 1).read(np.array([5]))


def test_an_unreadable_file_is_named_when_read(tmp_path):
  root = _folder(tmp_path / "pics")
  (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  source = folder.FolderSource(root, "train", 8, 1)
  assert source.files[2] == "b/boot.JPG" and source.files[3] == "b/broken.png"
  assert source.read(np.array([2]))["image"].shape == (1, 8, 8, 1)
  with pytest.raises(source_lib.SourceError, match="broken.png: not a readable PNG or JPEG"):
    source.read(np.array([0, 3]))


def test_open_source_reads_folder_paths_at_the_configs_resolution_and_channels(tmp_path):
  config = config_lib.load("configs/default.py:tiny")
  source = embed.open_source(config, f"folder:{_folder(tmp_path / 'pics')}", "train")
  assert isinstance(source, folder.FolderSource) and len(source) == 5
  assert source.read(np.arange(1))["image"].shape == (1, config.data.resolution,
                                                       config.data.resolution,
                                                       config.model.in_channels)
  with pytest.raises(source_lib.SourceError, match="is not a folder"):
    embed.open_source(config, f"folder:{tmp_path / 'nowhere'}", "train")
