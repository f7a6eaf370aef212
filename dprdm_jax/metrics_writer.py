"""The metrics of a training run: WORKDIR/metrics.jsonl, TensorBoard events, a progress bar, and at
the end the loss curve WORKDIR/loss.svg. Every trainer writes through `MetricsWriter`.

metrics.jsonl has one JSON object per record: `step`, the trainer's metrics (`loss` always) and
`steps_per_second` and `examples_per_second`. A resumed run appends; its records after the
checkpoint replace the earlier run's in `curves.read_metrics` (the last record of a step wins).
The same numbers go to TensorBoard events under WORKDIR/tensorboard. Only process 0 writes; the
others keep no files.
"""

import json
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np

from dprdm_jax import curves

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOT = "loss.svg"


class MetricsWriter:
  """Records of a run's metrics, with a tqdm bar on a terminal and a printed line elsewhere.

  The metrics named in `mean_of` are each record's mean over the steps since the previous record
  (kept on device until the record, so logging adds no per-step synchronisation); the others are
  the record's step's. steps/s is timed from the first step's end (`restart_clock`), so the
  compilation of the step is not counted.
  """

  def __init__(self, workdir, *, name: str, total: int, start: int, examples_per_step: int,
               mean_of: Sequence[str] = ("loss",)):
    self._on = jax.process_index() == 0
    self._workdir = pathlib.Path(workdir)
    self._name, self._total = name, total
    self._examples = examples_per_step
    self._mean_of = tuple(mean_of)
    self._pending = []
    self._last = (start, time.perf_counter())
    self._bar = None
    if not self._on:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._workdir.mkdir(parents=True, exist_ok=True)
    self._events = SummaryWriter(str(self._workdir / TENSORBOARD))
    self._jsonl = (self._workdir / JSONL).open("a")
    if sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step", desc=name,
                            dynamic_ncols=True)

  def restart_clock(self, step: int, metrics: dict) -> None:
    """Times steps/s from the end of `step` (its metrics given, waited for)."""
    jax.block_until_ready(metrics)
    self._last = (step, time.perf_counter())

  def add(self, metrics: dict) -> None:
    """Notes one step's metrics (device arrays; nothing waits for them here)."""
    self._pending.append({k: metrics[k] for k in self._mean_of})

  def write(self, step: int, metrics: dict) -> None:
    """Writes the record of `step`, whose metrics were the last `add`ed."""
    pending, self._pending = self._pending, []
    if not self._on:
      return
    # Fetching the values waits for the steps dispatched so far, so the clock is read after it.
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for k, values in jax.device_get({k: [p[k] for p in pending] for k in self._mean_of}).items():
      record[k] = float(np.mean(values))
    last_step, last_time = self._last
    now = time.perf_counter()
    steps_per_second = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    record.update(step=step, steps_per_second=steps_per_second,
                  examples_per_second=steps_per_second * self._examples)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      if name != "step":
        self._events.add_scalar(name, value, step)
    self._events.flush()
    shown = {k: f"{v:.4g}" for k, v in record.items()
             if k not in ("step", "steps_per_second", "examples_per_second")}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(ex_per_s=f"{record['examples_per_second']:.0f}", **shown)
    else:
      print(f"{self._name} step {step}/{self._total}: "
            + ", ".join(f"{k} {v}" for k, v in shown.items())
            + f", {record['examples_per_second']:,.0f} examples/s", file=sys.stderr, flush=True)

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the files and plots the whole run's loss (every record so far) into loss.svg."""
    if not self._on:
      return
    self._events.close()
    self._jsonl.close()
    if self._bar is not None:
      self._bar.close()
    path = self._workdir / JSONL
    if path.stat().st_size:
      curves.write_loss_plot(path, self._workdir / PLOT,
                             f"{self._name}: loss, global batch {self._examples}")
