"""The loss plot `dprdm train` writes: the records it reads and the SVG it draws."""

import json
from xml.etree import ElementTree

import pytest

from dprdm_jax import curves


def test_the_last_record_of_each_step_wins_in_step_order(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [dict(step=50, loss=1.0), dict(step=100, loss=0.5), dict(step=150, loss=0.4),
             dict(step=100, loss=0.6), dict(step=150, loss=0.3), dict(step=200, loss=0.2)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
  got = curves.read_metrics(path)
  assert [(r["step"], r["loss"]) for r in got] == [(50, 1.0), (100, 0.6), (150, 0.3), (200, 0.2)]


def _points(svg: str) -> list[tuple[float, float]]:
  root = ElementTree.fromstring(svg)
  line = root.find("{http://www.w3.org/2000/svg}polyline")
  return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def test_plot_maps_values_monotonically_inside_the_frame(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(dict(step=s, loss=l)) + "\n"
                          for s, l in ((10, 0.9), (20, 0.25), (30, 0.5))))
  curves.write_loss_svg(path, tmp_path / "loss.svg", "a <title> & more")
  svg = (tmp_path / "loss.svg").read_text()
  points = _points(svg)  # also checks that the escaped title leaves valid XML
  assert len(points) == 3
  xs, ys = zip(*points)
  assert xs[0] < xs[1] < xs[2] and 0 <= min(xs) and max(xs) <= 640
  # SVG y grows downwards: the largest loss is the highest point.
  assert ys[0] < ys[2] < ys[1] and 0 <= min(ys) and max(ys) <= 320
  texts = [t.text for t in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
  assert "a <title> & more" in texts and "training step" in texts


def test_ticks_are_round_and_cover_the_range():
  ticks = curves._ticks  # pylint: disable=protected-access
  assert ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert ticks(50, 3000) == [500 * i for i in range(1, 7)]


def test_a_single_point_and_bad_input():
  assert len(_points(curves.line_svg([5], [0.1], "t", "x", "y"))) == 1
  with pytest.raises(ValueError, match="as many"):
    curves.line_svg([1, 2], [1], "t", "x", "y")


def test_log_scale_puts_equal_ratios_at_equal_distances():
  points = _points(curves.line_svg([0, 1, 2], [1.0, 0.1, 0.01], "t", "x", "y", log_y=True))
  (_, a), (_, b), (_, c) = points
  assert a < b < c and abs((b - a) - (c - b)) < 0.2
  svg = curves.line_svg([0, 1], [0.03, 0.9], "t", "x", "y", log_y=True)
  y_ticks = [t.text for t in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")
             if t.get("text-anchor") == "end"]
  assert y_ticks == ["0.05", "0.1", "0.2", "0.5"]
  with pytest.raises(ValueError, match="positive"):
    curves.line_svg([0, 1], [0.5, 0.0], "t", "x", "y", log_y=True)
