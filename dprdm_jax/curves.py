"""Training curves from metrics.jsonl, drawn with matplotlib (docs/default-loss.svg is one).

Every trainer writes WORKDIR/loss.svg at the end of a run (metrics_writer.py; the TensorBoard
events hold the same numbers). A resumed run logs again the steps after its checkpoint; the last
record of each step wins, which is the record of the run that continued.
"""

import json
import pathlib

from dprdm_jax import errors

X_LABEL = "training step"
Y_LABEL = "loss (mean since the last point)"


def read_metrics(path) -> list[dict]:
  """The records of a metrics.jsonl, one per step (the last written), in step order."""
  by_step = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def loss_figure(records: list[dict], title: str):
  """A matplotlib Figure of each record's `loss` against its `step`, log-scale loss axis.

  Raises InputError for no records or a loss <= 0 (which a log axis cannot show).
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  if not records:
    raise errors.InputError("no metrics records to plot")
  steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
  if min(losses) <= 0:
    raise errors.InputError(f"a log-scale loss axis needs positive values, got {min(losses)}")
  fig = figure.Figure(figsize=(6.4, 3.2), layout="constrained")
  ax = fig.add_subplot()
  ax.plot(steps, losses, color="#1f77b4", linewidth=1.5)
  ax.set_yscale("log")
  ax.set(title=title, xlabel=X_LABEL, ylabel=Y_LABEL)
  ax.grid(True, which="both", color="#ddd", linewidth=0.6)
  return fig


def write_loss_plot(metrics_path, out, title: str) -> None:
  """Plots the loss of metrics_path (`read_metrics`) into `out`, as SVG with text kept as text.

  The file is a function of the records and the title alone (no date, fixed element ids).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig = loss_figure(read_metrics(metrics_path), title)
  with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dprdm"}):
    fig.savefig(out, format="svg", metadata={"Date": None})
