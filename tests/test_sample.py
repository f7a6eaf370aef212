"""The pieces of `dprdm sample`: which test images, which neighbours, the grid and the pixels.

The end-to-end run (a trained tiny U-Net, the real tower and store) is in tests/test_train.py.
"""

import numpy as np
import pytest

from dprdm_jax import errors
from dprdm_jax import sample
from dprdm_jax.data import source as source_lib
from tests.test_configs import load


def _source(labels, ids=None):
  n = len(labels)
  return source_lib.ArraySource(
      name="toy", class_names=("a", "b", "c"),
      images=np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1),
      labels=np.asarray(labels, np.int32), captions=np.asarray([f"c{l}" for l in labels], object),
      ids=np.arange(n, dtype=np.uint32) * 10 if ids is None else np.asarray(ids, np.uint32))


def test_rows_take_the_first_of_each_class_then_the_second():
  toy = _source([2, 0, 0, 1, 2, 1, 0])
  assert sample.pick_rows(toy, 3).tolist() == [1, 3, 0]
  assert sample.pick_rows(toy, 5).tolist() == [1, 3, 0, 2, 5]
  assert sample.pick_rows(toy, 100).tolist() == [1, 3, 0, 2, 5, 4, 6]


def test_rows_without_labels_are_the_first_records():
  assert sample.pick_rows(_source([-1] * 5), 3).tolist() == [0, 1, 2]


def test_positions_of_ids_in_any_order():
  toy = _source([0, 1, 2, 0], ids=[40, 10, 30, 20])
  assert sample.positions_of(toy, np.array([20, 40, 10, 20], np.uint32)).tolist() == [3, 0, 1, 3]
  with pytest.raises(ValueError, match="does not hold every id"):
    sample.positions_of(toy, np.array([25], np.uint32))
  with pytest.raises(ValueError, match="does not hold every id"):
    sample.positions_of(toy, np.array([41], np.uint32))


def test_pixels_map_the_training_scale_back():
  got = sample.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0]))
  assert got.tolist() == [0, 0, 128, 255, 255] and got.dtype == np.uint8


def test_grid_places_each_tile_and_leaves_blanks():
  a = np.full((2, 2, 1), 10, np.uint8)
  b = np.full((2, 2, 1), 200, np.uint8)
  picture = sample.grid([[a, None, b], [b]], scale=2, gap=1)
  step = 2 * 2 + 1
  assert picture.shape == (2 * step + 1, 3 * step + 1, 1)
  assert (picture[1:5, 1:5] == 10).all()
  assert (picture[1:5, 1 + step:5 + step] == 96).all()  # None: background
  assert (picture[1:5, 1 + 2 * step:5 + 2 * step] == 200).all()
  assert (picture[1 + step:5 + step, 1:5] == 200).all()
  assert (picture[0] == 96).all() and (picture[:, 5] == 96).all()  # gaps


def test_png_round_trip(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = np.random.default_rng(0).integers(0, 256, (6, 9, 1), dtype=np.uint8)
  sample.write_png(picture, tmp_path / "sub" / "g.png")
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "g.png")), picture[..., 0])


@pytest.mark.parametrize("rows, per_row", [(0, 6), (20, 0), (sample.MAX_ROWS + 1, 6),
                                           (10**8, 6), (20, sample.MAX_PER_ROW + 1)])
def test_a_grid_too_small_or_too_large_is_refused_before_any_work(rows, per_row, tmp_path):
  """--rows 100000000 drew every test image into one PNG (11 GB held after two minutes): the
  bounds are checked before the model, data or towers are touched (the work directory here holds
  nothing)."""
  with pytest.raises(errors.InputError, match=r"rows must lie in \[1, 200\]"):
    sample.sample_grid(load("configs/default.py:tiny"), tmp_path / "empty", tmp_path / "g.png",
                       rows, per_row)
  assert not list(tmp_path.iterdir())
