"""The loss plot every trainer writes: the records it reads and the matplotlib figure it draws."""

import json
from xml.etree import ElementTree

import numpy as np
import pytest

from dprdm_jax import curves

SVG = "{http://www.w3.org/2000/svg}"


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
  return path


def test_the_last_record_of_each_step_wins_in_step_order(tmp_path):
  records = [dict(step=50, loss=1.0), dict(step=100, loss=0.5), dict(step=150, loss=0.4),
             dict(step=100, loss=0.6), dict(step=150, loss=0.3), dict(step=200, loss=0.2)]
  got = curves.read_metrics(_write(tmp_path / "metrics.jsonl", records))
  assert [(r["step"], r["loss"]) for r in got] == [(50, 1.0), (100, 0.6), (150, 0.3), (200, 0.2)]


def test_the_figure_plots_each_records_loss_at_its_step_on_a_log_axis():
  records = [dict(step=10, loss=0.9), dict(step=20, loss=0.25), dict(step=30, loss=0.5)]
  (ax,) = curves.loss_figure(records, "a title").axes
  (line,) = ax.lines
  np.testing.assert_array_equal(line.get_xydata(), [[10, 0.9], [20, 0.25], [30, 0.5]])
  assert ax.get_yscale() == "log" and ax.get_title() == "a title"
  assert ax.get_xlabel() == curves.X_LABEL and ax.get_ylabel() == curves.Y_LABEL


def test_the_svg_keeps_its_text_and_is_the_same_for_the_same_records(tmp_path):
  metrics = _write(tmp_path / "metrics.jsonl", [dict(step=s, loss=1 / s) for s in (1, 2, 4)])
  curves.write_loss_plot(metrics, tmp_path / "a.svg", "a <title> & more")
  curves.write_loss_plot(metrics, tmp_path / "b.svg", "a <title> & more")
  svg = (tmp_path / "a.svg").read_text()
  assert svg == (tmp_path / "b.svg").read_text()  # no date, fixed element ids
  texts = {t.text for t in ElementTree.fromstring(svg).iter(f"{SVG}text")}  # valid XML
  assert {"a <title> & more", curves.X_LABEL, curves.Y_LABEL} <= texts


def test_no_records_or_a_loss_a_log_axis_cannot_show_is_refused():
  with pytest.raises(ValueError, match="no metrics records"):
    curves.loss_figure([], "t")
  with pytest.raises(ValueError, match="positive"):
    curves.loss_figure([dict(step=1, loss=0.5), dict(step=2, loss=0.0)], "t")
