"""TfdsSource on mocked and on tiny real tensorflow-datasets splits, all without TensorFlow.

TfdsSource restores a builder from the prepared directory's metadata, so the tests write that
metadata (features mirroring the datasets' generation code, which needs TensorFlow to run for
coco_captions) and mock with `tfds.testing.mock_data(policy=USE_FILES, data_dir=...)`: the mock
then serves `num_examples` random, deterministic records in place of the ArrayRecord files. The
mock hands out decoded records, so the unmocked tests also write real ArrayRecord shards, to read
encoded images and captions through tensorflow-datasets' NumPy decoding.
"""

import io
import sys

from array_record.python import array_record_module
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dprdm_jax.data import source
from dprdm_jax.data import tfds_source

CIFAR10_PROMPTS = {
    "airplane": "an airplane, high quality photograph",
    "automobile": "an automobile, high quality photograph",
    "bird": "a bird, high quality photograph",
    "cat": "a cat, high quality photograph",
    "deer": "a deer, high quality photograph",
    "dog": "a dog, high quality photograph",
    "frog": "a frog, high quality photograph",
    "horse": "a horse, high quality photograph",
    "ship": "a ship, high quality photograph",
    "truck": "a truck, high quality photograph",
}
IMAGENET_IDS = ["n01440764", "n01443537", "n15075141"]  # the first two and the last of 1,000
MOCKED = 12  # records the mock serves per split


def features(name):
  """The features of the prepared dataset, as its generation code (tfds 4.9.10) declares them."""
  if name == "cifar10":
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(names=list(CIFAR10_PROMPTS)),
    })
  if name == "imagenet2012":
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=IMAGENET_IDS),
        "file_name": tfds.features.Text(),
    })
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "objects": tfds.features.Sequence({
          "id": np.int64,
          "area": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(num_classes=80),
          "is_crowd": np.bool_,
      }),
      "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
  })


def prepare(data_dir, name, splits, file_format="array_record"):
  """Writes `name`'s metadata and, per split, one ArrayRecord shard of the given examples."""
  dataset = tfds_source.DATASETS[name]
  version_dir = data_dir / dataset.path
  version_dir.mkdir(parents=True)
  feats = features(name)
  split_infos = []
  for split, examples in splits.items():
    template = tfds.core.ShardedFileTemplate(
        data_dir=version_dir, dataset_name=dataset.builder, split=split,
        filetype_suffix=file_format)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)],
                                           num_bytes=0, filename_template=template))
    writer = array_record_module.ArrayRecordWriter(
        str(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
    for example in examples:
      writer.write(feats.serialize_example(example))
    writer.close()
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(
          name=dataset.builder, version=tfds.core.Version(dataset.version),
          data_dir=str(data_dir), module_name="tests", config_name=dataset.config),
      features=feats, split_dict=tfds.core.SplitDict(split_infos))
  info.set_file_format(file_format)
  info.write_to_directory(version_dir)


def encoded(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt)
  return buffer.getvalue()


def cifar10_example(label, colour):
  return {"id": f"train_{label}", "label": label,
          "image": encoded(np.full((32, 32, 3), colour, np.uint8), "PNG")}


def coco_example(image, captions):
  return {"image": encoded(image, "JPEG"), "image/filename": "x.jpg", "image/id": 7,
          "objects": {"id": [], "area": [], "bbox": np.zeros((0, 4), np.float32), "label": [],
                      "is_crowd": []},
          "captions": {"text": captions, "id": list(range(len(captions)))}}


def imagenet_example(image, label):
  return {"image": encoded(image, "JPEG"), "label": label, "file_name": "x.JPEG"}


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  """Metadata (and an empty shard) of a train split of each dataset, for mock_data to read."""
  root = tmp_path_factory.mktemp("tfds_metadata")
  for name in tfds_source.DATASETS:
    prepare(root, name, {"train": []})
  return root


@pytest.fixture
def mocked(metadata_dir):
  with tfds.testing.mock_data(num_examples=MOCKED, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(metadata_dir)):
    yield


def check_format(records, n, resolution):
  assert records["image"].shape == (n, resolution, resolution, 3)
  assert records["image"].dtype == np.uint8
  assert records["label"].shape == (n,) and records["label"].dtype == np.int32
  assert records["caption"].shape == (n,) and records["caption"].dtype == object
  assert all(isinstance(c, str) and c for c in records["caption"])
  assert records["id"].shape == (n,) and records["id"].dtype == np.uint32


@pytest.mark.parametrize("resolution", [16, 32, 48])
def test_mocked_cifar10(mocked, resolution):
  del mocked
  data = tfds_source.TfdsSource("cifar10", "train", resolution, data_dir="/unused")
  assert len(data) == MOCKED
  assert (data.name, data.resolution, data.channels) == ("cifar10", resolution, 3)
  assert data.class_names == tuple(CIFAR10_PROMPTS)
  positions = np.array([0, 5, 11, 5])
  records = data.read(positions)
  check_format(records, 4, resolution)
  assert np.all((records["label"] >= 0) & (records["label"] < 10))
  assert list(records["caption"]) == [CIFAR10_PROMPTS[data.class_names[label]]
                                      for label in records["label"]]
  np.testing.assert_array_equal(records["id"], positions)


@pytest.mark.parametrize("resolution", [8, 64])
def test_mocked_coco_captions(mocked, resolution):
  del mocked
  data = tfds_source.TfdsSource("coco_captions", "train", resolution)
  assert len(data) == MOCKED
  assert data.class_names == ()
  records = data.read(np.arange(MOCKED))
  check_format(records, MOCKED, resolution)
  assert np.all(records["label"] == -1)
  np.testing.assert_array_equal(records["id"], np.arange(MOCKED))


@pytest.mark.parametrize("name", sorted(tfds_source.DATASETS))
def test_records_and_ids_are_deterministic(mocked, name):
  del mocked
  positions = np.array([3, 1, 3, 7])
  first = tfds_source.TfdsSource(name, "train", 24).read(positions)
  again = tfds_source.TfdsSource(name, "train", 24)
  for records in (again.read(positions), again.read(positions)):
    for field in source.FIELDS:
      np.testing.assert_array_equal(records[field], first[field])
  assert len(tfds_source.TfdsSource(name, "train", 24).read(np.array([], np.int64))["id"]) == 0


@pytest.mark.parametrize("positions", [[0, MOCKED], [-1], [[0]], [0.0]])
def test_bad_positions_are_refused(mocked, positions):
  del mocked
  with pytest.raises(source.SourceError, match="positions"):
    tfds_source.TfdsSource("cifar10", "train", 32).read(np.array(positions))


def test_unsupported_name_is_refused():
  with pytest.raises(source.SourceError, match="unsupported.*mnist.*cifar10, coco_captions, imagenet2012"):
    tfds_source.TfdsSource("mnist", "train", 32)


def test_missing_split_is_refused(mocked):
  del mocked
  with pytest.raises(source.SourceError, match="no split 'validation'.*train"):
    tfds_source.TfdsSource("cifar10", "validation", 32)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(source.SourceError, match=r"not prepared(.|\n)*tfds build coco_captions/2014 "
                     r"--file_format=array_record(.|\n)*coco_captions/2014/1\.1\.0"):
    tfds_source.TfdsSource("coco_captions", "train", 32, data_dir=str(tmp_path))


def test_tfrecord_preparation_is_refused(tmp_path):
  prepare(tmp_path, "cifar10", {"train": []}, file_format="tfrecord")
  with pytest.raises(source.SourceError, match="prepared as tfrecord"):
    tfds_source.TfdsSource("cifar10", "train", 32, data_dir=str(tmp_path))


def test_real_cifar10_records(tmp_path):
  colours = {0: (250, 0, 0), 2: (0, 250, 0), 9: (0, 0, 250)}
  prepare(tmp_path, "cifar10", {"test": [cifar10_example(label, colours[label])
                                         for label in (0, 2, 9)]})
  data = tfds_source.TfdsSource("cifar10", "test", 32, data_dir=str(tmp_path))
  assert len(data) == 3
  records = data.read(np.array([2, 0, 1]))
  check_format(records, 3, 32)
  np.testing.assert_array_equal(records["label"], [9, 0, 2])
  assert list(records["caption"]) == [CIFAR10_PROMPTS["truck"], CIFAR10_PROMPTS["airplane"],
                                      CIFAR10_PROMPTS["bird"]]
  for image, label in zip(records["image"], records["label"]):
    assert np.all(image == colours[label])
  np.testing.assert_array_equal(data.read(np.array([1]))["image"][0], records["image"][2])
  assert "tensorflow" not in sys.modules


def test_real_coco_records_are_centre_cropped_and_resized(tmp_path):
  wide = np.zeros((64, 128, 3), np.uint8)
  wide[:, 32:96] = (0, 200, 0)  # the centre square is green, the sides black
  gray = np.full((60, 30), 90, np.uint8)
  prepare(tmp_path, "coco_captions", {"val": [
      coco_example(wide, ["a green square.", "second caption"]),
      coco_example(gray, ["a gray field"])]})
  data = tfds_source.TfdsSource("coco_captions", "val", 16, data_dir=str(tmp_path))
  records = data.read(np.array([0, 1]))
  check_format(records, 2, 16)
  assert list(records["caption"]) == ["a green square.", "a gray field"]
  np.testing.assert_array_equal(records["label"], [-1, -1])
  green = records["image"][0].astype(int)
  assert np.abs(green - (0, 200, 0)).max() <= 6  # JPEG error only, no black from the sides
  assert np.abs(records["image"][1].astype(int) - 90).max() <= 3
  assert "tensorflow" not in sys.modules


def test_real_imagenet_records_are_captioned_by_wordnet_id(tmp_path):
  prepare(tmp_path, "imagenet2012", {
      "validation": [imagenet_example(np.full((40, 50, 3), 120, np.uint8), 2),
                     imagenet_example(np.full((50, 40, 3), 30, np.uint8), 0)],
      "test": [imagenet_example(np.full((8, 8, 3), 9, np.uint8), -1)]})
  data = tfds_source.TfdsSource("imagenet2012", "validation", 16, data_dir=str(tmp_path))
  assert data.class_names == tuple(IMAGENET_IDS)
  records = data.read(np.array([0, 1]))
  check_format(records, 2, 16)
  np.testing.assert_array_equal(records["label"], [2, 0])
  assert list(records["caption"]) == ["n15075141", "n01440764"]
  assert np.abs(records["image"][0].astype(int) - 120).max() <= 3
  test = tfds_source.TfdsSource("imagenet2012", "test", 16, data_dir=str(tmp_path)).read(
      np.array([0]))
  assert test["label"][0] == -1 and test["caption"][0] == "unlabelled"
