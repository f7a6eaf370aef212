"""Wall time of the privacy accountant: epsilon of a long history and one noise calibration.

What is measured, with `dprdm_jax.privacy.accounting` (Google's dp-accounting underneath):

- epsilon of T = 100,000 queries of sigma = 0.2, q = 0.01, k = 18 at delta = 1e-7
  (`history_epsilon`), with the RDP and with the PLD accountant: median seconds of --reps runs;
- one calibration, `calibrate_noise_std` for target epsilon 1.0, q = 0.01, k = 18, T = 1000,
  delta = 1e-7, with RDP and with PLD: median seconds of --calibration_reps runs;
- PLD calibrations at the settings of configs/coco.py and configs/cifar10.py and two extremes;
- the PLD grid (`accounting.pld_discretization`, 20 points per spread of one query's privacy
  loss) against grids 5 times finer and the fixed step of 1e-4 used before: epsilon and seconds
  on eight settings, so that the grid's accuracy is measured, not assumed;
- the start-up of the command line: wall seconds of the whole `dprdm privacy epsilon` command (the
  console script beside this Python, a fresh process each time), against a bare interpreter and
  against `import dp_accounting` alone, the floor for any command that uses it: median of
  --startup_reps runs.

Peer, measured in the same run: the DP-RDM authors' accountant, Opacus' RDP analysis
(`compute_rdp` + `get_privacy_spent` over Opacus' default orders for epsilon, and
`opacus.accountants.utils.get_noise_multiplier` with its default tolerance of 0.01 in epsilon for
calibration), on the same Poisson-subsampled Gaussian with noise multiplier k*sigma/2. Opacus is in
the `bench` extra.

Run from the repository root:

  python benchmarks/accounting.py

About 40 seconds on a 2-core machine (most of it the fine reference grids).
"""

import datetime
from importlib import metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from dp_accounting import pld
from opacus.accountants import rdp as opacus_rdp_accountant
from opacus.accountants import utils as opacus_utils
from opacus.accountants.analysis import rdp as opacus_rdp

import machine_info  # benchmarks/machine_info.py, beside this script
from dprdm_jax.privacy import accounting

_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions of each epsilon computation.")
_CALIBRATION_REPS = flags.DEFINE_integer("calibration_reps", 1,
                                         "Timed calibrations per accountant.")
_STARTUP_REPS = flags.DEFINE_integer("startup_reps", 10, "Timed runs of each start-up command.")

_SIGMA = 0.2
_SAMPLING_RATE = 0.01
_NEIGHBORS = 18
_DELTA = 1e-7
_LONG_HISTORY = 100_000
_TARGET_EPSILON = 1.0
_CALIBRATION_QUERIES = 1000


def _timed(fn: Callable[[], float], reps: int) -> tuple[float, float]:
  """(median seconds, result) of reps calls of fn."""
  times, result = [], None
  for _ in range(reps):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def _opacus_epsilon() -> float:
  """The authors' accountant: Opacus RDP for T queries of the same mechanism."""
  z = _SIGMA * _NEIGHBORS / 2
  orders = opacus_rdp_accountant.RDPAccountant.DEFAULT_ALPHAS
  rdp = opacus_rdp.compute_rdp(q=_SAMPLING_RATE, noise_multiplier=z, steps=_LONG_HISTORY,
                               orders=orders)
  return opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=_DELTA)[0]


def _opacus_sigma() -> float:
  """The authors' calibration: Opacus' noise multiplier for the target, as sigma = 2z/k."""
  z = opacus_utils.get_noise_multiplier(target_epsilon=_TARGET_EPSILON, target_delta=_DELTA,
                                        sample_rate=_SAMPLING_RATE, steps=_CALIBRATION_QUERIES,
                                        accountant="rdp")
  return 2 * z / _NEIGHBORS


# (q, z, T, delta) of the grid comparison; the calibrations' (epsilon, q, T, delta, what).
_GRID_SETTINGS = [(0.01, 1.8, 1000, 1e-7), (0.01, 1.8, 100_000, 1e-7), (0.01, 0.8, 10_000, 9e-6),
                  (0.02, 0.68, 1000, 2e-5), (1.0, 5.0, 100, 1e-5), (0.01, 15.0, 100_000, 1e-6),
                  (0.001, 0.6, 100_000, 1e-6), (1.0, 50.0, 1000, 1e-5)]
_CALIBRATIONS = [(10.0, 0.01, 10_000, 1 / 113_287, "configs/coco.py"),
                 (9.4, 0.02, 1000, 1 / 50_000, "configs/cifar10.py"),
                 (1.0, 0.01, 100_000, 1e-6, "small epsilon, long history"),
                 (50.0, 0.1, 100, 1e-5, "large epsilon, high rate")]


def _grid_rows() -> list[str]:
  """epsilon on the fitted grid, a grid 5 times finer, and the old fixed step 1e-4."""
  lines = [f"{'setting (q, z, T, delta)':>34}  {'fitted grid':>22}  {'5x finer':>22}  "
           f"{'fixed 1e-4':>22}",
           f"{'-' * 34}  {'-' * 22}  {'-' * 22}  {'-' * 22}"]
  for q, z, t, delta in _GRID_SETTINGS:
    event = accounting.history_event({accounting.Mechanism(z, q, 2): t})  # k = 2: z = sigma
    cells = []
    for points in (accounting.PLD_POINTS_PER_SPREAD, 5 * accounting.PLD_POINTS_PER_SPREAD, None):
      start = time.perf_counter()
      if points is None:
        eps = float(pld.PLDAccountant(accounting.NEIGHBORING_RELATION, 1e-4).compose(event)
                    .get_epsilon(delta))
      else:
        eps = accounting.epsilon(event, delta, "pld", points)
      cells.append((eps, time.perf_counter() - start))
    reference = cells[1][0]
    lines.append(f"{f'{q:g}, {z:g}, {t:,}, {delta:.2g}':>34}  " + "  ".join(
        f"{eps:9.5f} {100 * (eps / reference - 1):+6.3f}% {seconds:4.2f}s"
        for eps, seconds in cells))
  return lines


def _startup_rows() -> list[str]:
  """Median wall seconds of fresh processes: the CLI command, import dp_accounting, bare Python."""
  script = os.path.join(os.path.dirname(sys.executable), "dprdm")
  if not os.path.exists(script):
    raise app.UsageError(f"no console script at {script}: install the package into this Python")
  epsilon = [script, "privacy", "epsilon", "--sigma", str(_SIGMA), "--sampling-rate",
             str(_SAMPLING_RATE), "--neighbors", str(_NEIGHBORS), "--queries",
             str(_CALIBRATION_QUERIES), "--delta", str(_DELTA)]
  commands = [("dprdm privacy epsilon (RDP and PLD, T = 1,000)", epsilon),
              ("python -c 'import dp_accounting' (floor)",
               [sys.executable, "-c", "import dp_accounting"]),
              ("python -c pass (interpreter)", [sys.executable, "-c", "pass"])]
  lines = []
  for name, command in commands:
    runs = []
    for _ in range(_STARTUP_REPS.value):
      start = time.perf_counter()
      subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
      runs.append(time.perf_counter() - start)
    lines.append(f"  {name:<48} median {statistics.median(runs):.2f} s "
                 f"(min {min(runs):.2f}, max {max(runs):.2f})")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.ERROR)  # dp-accounting's convergence warnings
  load = machine_info.BackgroundLoad.started()
  mechanism = accounting.Mechanism(_SIGMA, _SAMPLING_RATE, _NEIGHBORS)

  results = []
  for acc in accounting.ACCOUNTANTS:
    seconds, eps = _timed(
        lambda acc=acc: accounting.history_epsilon({mechanism: _LONG_HISTORY}, _DELTA, acc),
        _REPS.value)
    results.append((f"ours {acc.upper()} epsilon, T = {_LONG_HISTORY:,}", seconds,
                    f"epsilon = {eps:.4f}"))
  seconds, eps = _timed(_opacus_epsilon, _REPS.value)
  results.append((f"Opacus RDP epsilon (peer), T = {_LONG_HISTORY:,}", seconds,
                  f"epsilon = {eps:.4f}"))
  for acc in accounting.ACCOUNTANTS:
    seconds, sigma = _timed(
        lambda acc=acc: accounting.calibrate_noise_std(
            _TARGET_EPSILON, _SAMPLING_RATE, _NEIGHBORS, _CALIBRATION_QUERIES, _DELTA, acc),
        _CALIBRATION_REPS.value)
    check = accounting.history_epsilon(
        {accounting.Mechanism(sigma, _SAMPLING_RATE, _NEIGHBORS): _CALIBRATION_QUERIES}, _DELTA,
        acc)
    results.append((f"ours {acc.upper()} calibrate_noise_std, T = {_CALIBRATION_QUERIES:,}",
                    seconds, f"sigma = {sigma:.5f} (epsilon {check:.4f})"))
  calibrations = []
  for eps, q, t, delta, what in _CALIBRATIONS:
    seconds, z = _timed(lambda: accounting.calibrate_noise_multiplier(eps, q, t, delta, "pld"), 1)
    check = accounting.epsilon(accounting.history_event({accounting.Mechanism(z, q, 2): t}),  # z
                               delta, "pld")
    calibrations.append(f"  PLD z for epsilon {eps:g}, q = {q:g}, T = {t:,}, delta = "
                        f"{delta:.2g} ({what}): {seconds:.2f} s, z = {z:.5f} (epsilon {check:.4f})")
  seconds, sigma = _timed(_opacus_sigma, _CALIBRATION_REPS.value)
  check = accounting.history_epsilon(
      {accounting.Mechanism(sigma, _SAMPLING_RATE, _NEIGHBORS): _CALIBRATION_QUERIES}, _DELTA,
      "rdp")
  results.append((f"Opacus get_noise_multiplier (peer), T = {_CALIBRATION_QUERIES:,}", seconds,
                  f"sigma = {sigma:.5f} (epsilon by our RDP {check:.4f})"))

  print("Privacy accounting wall time (benchmarks/accounting.py)")
  print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPUs, {machine_info.cpu_model()}")
  print(f"versions: python {platform.python_version()}, "
        f"dp-accounting {metadata.version('dp-accounting')}, numpy {metadata.version('numpy')}, "
        f"scipy {metadata.version('scipy')}")
  print(f"epsilon: sigma = {_SIGMA}, q = {_SAMPLING_RATE}, k = {_NEIGHBORS} "
        f"(noise multiplier {mechanism.noise_multiplier:g}), delta = {_DELTA:g}, "
        f"median of {_REPS.value} runs")
  print(f"calibration: target epsilon {_TARGET_EPSILON}, q = {_SAMPLING_RATE}, k = {_NEIGHBORS}, "
        f"delta = {_DELTA:g}, median of {_CALIBRATION_REPS.value} run(s); PLD grid: "
        f"{accounting.PLD_POINTS_PER_SPREAD} points per spread of one query's loss "
        f"(step {accounting.pld_discretization(mechanism.event()):.2g} here)")
  print(f"peer: Opacus {metadata.version('opacus')} (the DP-RDM authors' accountant)")
  print()
  width = max(len(name) for name, _, _ in results)
  print(f"{'computation'.ljust(width)}  {'seconds':>9}  result")
  print(f"{'-' * width}  {'-' * 9}  {'-' * 6}")
  for name, seconds, result in results:
    print(f"{name.ljust(width)}  {seconds:9.3f}  {result}")
  seconds = [t for _, t, _ in results]  # ours RDP, PLD, Opacus; calibrations likewise
  print()
  print("ratios, Opacus seconds / ours (> 1: ours is faster):")
  print(f"  epsilon at T = {_LONG_HISTORY:,}: RDP {seconds[2] / seconds[0]:.2f}, "
        f"PLD {seconds[2] / seconds[1]:.2f}")
  print(f"  calibration at T = {_CALIBRATION_QUERIES:,}: RDP {seconds[5] / seconds[3]:.2f}, "
        f"PLD {seconds[5] / seconds[4]:.2f} (ours to 1e-4 in z, Opacus to 0.01 in epsilon)")
  print()
  print("more PLD calibrations (to 1e-4 in z, one run each):")
  print("\n".join(calibrations))
  print()
  print("PLD grids: epsilon, its difference from the grid 5 times finer, seconds (every grid "
        "gives an upper bound):")
  print("\n".join(_grid_rows()))
  print()
  print(f"start-up, wall seconds of a fresh process, {_STARTUP_REPS.value} runs each:")
  print("\n".join(_startup_rows()))
  print(load.summary())


if __name__ == "__main__":
  app.run(main)
