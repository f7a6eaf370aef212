"""The ledger under load and SIGKILLs: P processes release Q queries each while K random kills
land, each killed process restarted; then every released query must be charged, no query number
or noise key released twice, and the file must verify.

  python -m tests.privacy.ledger_load --processes 8 --queries 10000 --kills 100
runs the full version (the README's figures); tests/privacy/test_ledger.py runs a reduced one.
"""

import argparse
import contextlib
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from dprdm_jax.privacy import ledger as ledger_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _spawn(path, out, queries):
  return subprocess.Popen([sys.executable, "-m", "tests.privacy.ledger_worker", "release_n",
                           str(path), "fp", str(out), str(queries)], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True)


def run(directory, processes: int, queries: int, kills: int, seed: int = 0,
        progress: bool = False) -> dict:
  """Runs the load and returns what it found (see the module docstring); `progress` prints a
  line a minute to stderr."""
  directory = pathlib.Path(directory)
  path = directory / "ledger.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 1000.0, 1e-5, "rdp")
  outs = [directory / f"released-{i}.txt" for i in range(processes)]
  procs = [_spawn(path, out, queries) for out in outs]
  rng = np.random.default_rng(seed)
  done_kills, start = 0, time.monotonic()
  lines = lambda out: len(out.read_text().splitlines()) if out.exists() else 0
  shown = start
  while True:
    if progress and time.monotonic() - shown >= 60:
      shown = time.monotonic()
      print(f"{shown - start:7.0f} s: {sum(lines(out) for out in outs):,} of "
            f"{processes * queries:,} released, {done_kills} of {kills} kills", file=sys.stderr,
            flush=True)
    for i, p in enumerate(procs):
      if p.poll() not in (None, 0, -signal.SIGKILL):
        raise RuntimeError(f"worker {i} failed: {p.stderr.read()}")
    running = [i for i, p in enumerate(procs) if p.poll() is None]
    if not running:
      unfinished = [i for i, out in enumerate(outs) if lines(out) < queries]
      if not unfinished:
        break
      for i in unfinished:
        procs[i] = _spawn(path, outs[i], queries)
      continue
    if done_kills < kills:
      # Spread the kills over the run: wait for a share of the total progress first.
      total = sum(lines(out) for out in outs)
      if total >= (done_kills + 1) * processes * queries / (kills + 1):
        victim = int(rng.choice(running))
        time.sleep(float(rng.uniform(0, 0.02)))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        done_kills += 1
        procs[victim] = _spawn(path, outs[victim], queries)
    time.sleep(0.002)
  seconds = time.monotonic() - start
  released = [tuple(map(int, line.split())) for out in outs for line in out.read_text().splitlines()]
  with ledger_lib.Ledger(path) as ledger:
    charges = ledger.charges("fp")
    problems = ledger.verify()
  charged = [first + i for _, first, n in charges for i in range(n)]
  numbers = [r[0] for r in released]
  return dict(processes=processes, queries=queries, kills=done_kills, seconds=seconds,
              released=len(released), charged=len(charged),
              released_uncharged=len(set(numbers) - set(charged)),
              numbers_released_twice=len(numbers) - len(set(numbers)),
              numbers_charged_twice=len(charged) - len(set(charged)),
              keys_released_twice=len(released) - len({r[1:] for r in released}),
              charged_unreleased=len(set(charged) - set(numbers)), problems=problems)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=8)
  parser.add_argument("--queries", type=int, default=10_000)
  parser.add_argument("--kills", type=int, default=100)
  parser.add_argument("--dir", help="keep the ledger and the released lines here (a new folder) "
                      "instead of a temporary one")
  args = parser.parse_args()
  with contextlib.ExitStack() as stack:
    if args.dir:
      directory = pathlib.Path(args.dir)
      directory.mkdir(parents=True)
    else:
      directory = stack.enter_context(tempfile.TemporaryDirectory())
    result = run(directory, args.processes, args.queries, args.kills, progress=True)
  for name, value in result.items():
    print(f"{name:>24}: {value}")


if __name__ == "__main__":
  main()
