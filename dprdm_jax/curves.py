"""Training curves from metrics.jsonl as a standalone SVG, for a README or a browser.

`dprdm train` writes WORKDIR/loss.svg at the end of every run (the TensorBoard events hold the
same numbers). A resumed run logs again the steps after its checkpoint; the last record of each
step wins, which is the record of the run that continued.
"""

import json
import math
import pathlib
from typing import Sequence
from xml.sax import saxutils


def read_metrics(path) -> list[dict]:
  """The records of a metrics.jsonl, one per step (the last written), in step order."""
  by_step = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round values covering [lo, hi]."""
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / count
  step = 10 ** math.floor(math.log10(raw))
  step *= next(m for m in (1, 2, 5, 10) if m * step >= raw / 1.5)
  return [round(i * step, 12) for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
  """The values 1, 2 and 5 times a power of ten in [lo, hi] (lo > 0)."""
  return [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
          for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]


def line_svg(xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str,
             log_y: bool = False, width: int = 640, height: int = 320) -> str:
  """A line plot of ys against xs with labelled axes, as SVG text; log_y: a log-scale y axis
  (every y must then be > 0)."""
  if len(xs) != len(ys) or not xs:
    raise ValueError(f"need as many x as y values, at least one; got {len(xs)} and {len(ys)}")
  if log_y and min(ys) <= 0:
    raise ValueError(f"a log-scale axis needs positive values, got {min(ys)}")
  left, right, top, bottom = 64, 16, 32, 48
  scale = math.log10 if log_y else float
  x0, x1 = min(xs), max(xs)
  y0, y1 = (min(ys), max(ys)) if log_y else (min(0.0, min(ys)), max(ys))
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 * 10 if log_y else y0 + 1)
  px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)
  py = lambda y: height - bottom - ((scale(y) - scale(y0)) / (scale(y1) - scale(y0)) *
                                    (height - top - bottom))
  esc = saxutils.escape
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>']
  for x in _ticks(x0, x1):
    out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{height - bottom}" '
               'stroke="#ddd"/>')
    out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
               f'{x:g}</text>')
  for y in (_log_ticks(y0, y1) if log_y else _ticks(y0, y1)):
    out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" '
               'stroke="#ddd"/>')
    out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
  out.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">{esc(x_label)}</text>')
  out.append(f'<text x="16" y="{height / 2}" text-anchor="middle" '
             f'transform="rotate(-90 16 {height / 2})">{esc(y_label)}</text>')
  points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
  out.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
  out.append("</svg>")
  return "\n".join(out) + "\n"


def write_loss_svg(metrics_path, out, title: str) -> None:
  """Plots the `loss` of each record of metrics_path against its step into `out`."""
  records = read_metrics(metrics_path)
  pathlib.Path(out).write_text(line_svg(
      [r["step"] for r in records], [r["loss"] for r in records], title, "training step",
      "loss (mean since the last point), log scale", log_y=True))
