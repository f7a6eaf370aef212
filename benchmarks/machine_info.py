"""Facts about the benchmark machine, and the timing helper, shared by the scripts in this folder.

`cpu_model` names the processor; `BackgroundLoad` measures how much CPU time processes other than
the benchmark used while it ran, so that a table measured on a busy machine says so.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional


def cpu_model() -> str:
  """The processor's model name from /proc/cpuinfo, or platform's guess."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _busy_and_steal_seconds() -> tuple[float, float]:
  """Machine-wide busy and stolen CPU seconds since boot, from /proc/stat."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq, steal = (fields + [0] * 8)[:8]
  tick = os.sysconf("SC_CLK_TCK")
  return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_seconds() -> float:
  """CPU seconds of this process and of its children that have ended (the contenders that the
  scripts run in subprocesses are the benchmark, not background)."""
  return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))


def unit_rows(rng, shape: tuple[int, ...]):
  """Random float32 rows of unit L2 norm (the last axis), the benchmarks' embeddings."""
  x = rng.standard_normal(shape, dtype="float32")
  return x / (x * x).sum(axis=-1, keepdims=True) ** 0.5


def process_memory() -> dict[str, int]:
  """VmRSS, VmHWM, RssAnon and RssFile of this process in bytes (only VmHWM without /proc)."""
  fields = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
          fields[name] = int(value.split()[0]) * 1024
  except OSError:
    pass
  if "VmHWM" not in fields:  # ru_maxrss is in KiB on Linux
    fields["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return fields


def reset_peak_memory() -> bool:
  """Resets this process's resident high-water mark (VmHWM); False where Linux does not let us."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class BackgroundLoad:
  """CPU seconds used by other processes (and stolen by the hypervisor) between start and stop."""

  def __init__(self):
    self._start = None

  def start(self) -> None:
    self._start = (time.perf_counter(), *_busy_and_steal_seconds(), _own_seconds())

  def summary(self) -> str:
    """One line: wall seconds, other processes' CPU seconds and average cores, stolen seconds."""
    if self._start is None:
      return "background load: not measured (/proc/stat unreadable)"
    wall0, busy0, steal0, own0 = self._start
    wall = time.perf_counter() - wall0
    busy, steal = _busy_and_steal_seconds()
    other = max(0.0, (busy - busy0) - (_own_seconds() - own0))
    return (f"background load during the run: other processes used {other:.1f} CPU-s in "
            f"{wall:.1f} s wall ({other / wall:.2f} cores on average), steal {steal - steal0:.1f} "
            f"CPU-s; figures are unreliable when this is well above 0")

  @classmethod
  def started(cls) -> "BackgroundLoad":
    load = cls()
    try:
      load.start()
    except (OSError, ValueError):
      pass
    return load


def median_seconds(fn, reps: int, warmup: int = 0) -> float:
  """Median wall seconds of reps calls of fn(), after warmup untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# XLA_FLAGS that make JAX see one CPU device per core: a mesh over them runs data parallel, each
# device's operations on its own core (one device's small operations leave a core idle).
ONE_DEVICE_PER_CORE = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"


def run_contenders(argv: list[str], names,
                   xla_flags: Optional[dict] = None) -> dict[str, tuple[list[str], dict]]:
  """Runs `argv[0] --contender=NAME argv[1:]` for each name, one after the other, each in its own
  process (thread pools of two runtimes in one process compete), with XLA_FLAGS set to
  xla_flags[NAME] where given; {name: (its printed lines, the JSON object of its last line)}."""
  results = {}
  for name in names:
    env = dict(os.environ)
    if xla_flags and name in xla_flags:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags[name]).strip()
    run = subprocess.run([sys.executable, argv[0], f"--contender={name}"] + argv[1:],
                         capture_output=True, text=True, check=True, env=env)
    lines = run.stdout.strip().splitlines()
    results[name] = (lines[:-1], json.loads(lines[-1]))
  return results
