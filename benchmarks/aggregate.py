"""Throughput of the DP aggregation kernel against the reference PyTorch code and plain NumPy.

What is measured: for B = 1024 queries and every k in {4, 16, 64}, d in {384, 512}, queries per
second of one batch of the noisy mean of k neighbours:

- ours: `dprdm_jax.privacy.aggregate.aggregate` (jitted; clip to the unit ball, mask, mean,
  per-query threefry noise, interpolation with the query), float32 inputs and, in a second row,
  bfloat16 inputs. The inputs are already device arrays and the B noise keys are derived before
  timing (the cost of `keys.query_keys` for one batch is printed separately).
- torch: the DP-RDM authors' aggregation, `m = x.mean(dim=1); m = m + torch.randn_like(m) * sigma`,
  on a float32 CPU tensor (B, k, d), with torch's default thread count. It neither clips nor
  masks nor interpolates, so it does less work than ours (and has no per-query keys).
- torch (same work): the same in PyTorch with what DP-RDM needs and the authors' code lacks:
  clip each neighbour to norm <= 1, zero the invalid slots, divide by k, add noise, interpolate
  with the normalised query.
- numpy: `m = x.mean(axis=1); m = m + rng.standard_normal((B, d)) * sigma` (float64 noise, NumPy's
  default, so the result is float64).

Each measurement is the median wall time of --reps calls after --warmup calls, the contenders of
one (k, d) called in turn so that a slow spell of the (shared, virtual) machine hits all of them
(for ours the warm-up includes compilation), with `.block_until_ready()` on ours. The table also
gives ours' neighbour input bandwidth, B*k*d*itemsize / time, as a fraction of the machine's
memory-copy bandwidth, measured as `np.copyto` of a --copy_mb MB float32 array (bytes read +
written per second, median of --reps copies). The bfloat16 rows compare ours on bfloat16 inputs with the float32 peers, whose
reference code takes float32 embeddings.

Run from the repository root, with the peer installed (`pip install torch==2.13.0`, the CPU build):

  python benchmarks/aggregate.py

About 40 seconds on a 2-core machine.
"""

import datetime
from importlib import metadata
import os
import platform
import statistics
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import torch

import machine_info  # benchmarks/machine_info.py, beside this script
from dprdm_jax.privacy import aggregate as aggregate_lib
from dprdm_jax.privacy import keys

_BATCH = flags.DEFINE_integer("batch", 1024, "Queries per batch (B).")
_NEIGHBORS = flags.DEFINE_list("neighbors", ["4", "16", "64"], "Values of k.")
_DIMS = flags.DEFINE_list("dims", ["384", "512"], "Embedding sizes d.")
_REPS = flags.DEFINE_integer("reps", 21, "Timed repetitions per measurement (median taken).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (compiles ours).")
_COPY_MB = flags.DEFINE_integer("copy_mb", 256, "Size in MB of the array copied for bandwidth.")

_SIGMA = 0.1
_INTERPOLATION = 0.5
_SEED = 20240601


def _interleaved_medians(fns: dict[str, Callable[[], object]], reps: int,
                         warmup: int) -> dict[str, float]:
  """Median wall time of each fn, calling them in turn rep after rep (after warmup calls each)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _copy_bandwidth(megabytes: int, reps: int) -> float:
  """Bytes read plus written per second by np.copyto of a float32 array of `megabytes` MB."""
  src = np.ones(megabytes * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  seconds = machine_info.median_seconds(lambda: np.copyto(dst, src), reps, warmup=1)
  return 2 * src.nbytes / seconds


def _unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Random float32 rows of L2 norm 1, like normalised CLIP embeddings."""
  x = rng.standard_normal(shape, dtype=np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _header(copy_bandwidth: float, keys_seconds: float) -> str:
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
  lines = [
      "DP aggregation throughput (benchmarks/aggregate.py)",
      f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"machine: {os.cpu_count()} CPUs (nproc {affinity}), {machine_info.cpu_model()}",
      f"versions: python {platform.python_version()}, numpy {np.__version__}, "
      f"jax {jax.__version__}, jaxlib {metadata.version('jaxlib')}, torch {torch.__version__}",
      f"jax devices: {', '.join(str(d) for d in jax.devices())}; "
      f"torch threads: {torch.get_num_threads()}; "
      f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}",
      f"B = {_BATCH.value}, sigma = {_SIGMA}, lambda = {_INTERPOLATION}, all slots valid; "
      f"median of {_REPS.value} runs after {_WARMUP.value} warm-up runs",
      f"memcpy bandwidth (np.copyto, {_COPY_MB.value} MB, read + write): "
      f"{copy_bandwidth / 1e9:.2f} GB/s",
      f"keys.query_keys for one batch of {_BATCH.value} (not in ours' times): "
      f"{keys_seconds * 1e3:.2f} ms",
      "units: q/s = queries per second (B / median batch time); GB/s = 1e9 bytes per second of "
      "neighbours (B*k*d*itemsize) read by ours; frac = that / memcpy bandwidth",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # hides JAX's note that no TPU is present
  load = machine_info.BackgroundLoad.started()
  b, reps, warmup = _BATCH.value, _REPS.value, _WARMUP.value
  copy_bandwidth = _copy_bandwidth(_COPY_MB.value, reps)
  keys_seconds = machine_info.median_seconds(
      lambda: keys.query_keys(_SEED, 0, b, keys.Stream.NOISE).block_until_ready(), reps, warmup)
  noise_keys = keys.query_keys(_SEED, 0, b, keys.Stream.NOISE)
  rng = np.random.default_rng(_SEED)
  torch.manual_seed(_SEED)

  columns = ("k", "d", "dtype", "ours q/s", "torch q/s", "same-work", "numpy q/s", "/torch",
             "/same-work", "/numpy", "ours GB/s", "frac memcpy")
  widths = (4, 5, 9, 10, 10, 10, 10, 7, 10, 7, 10, 12)
  rows = []
  for k in map(int, _NEIGHBORS.value):
    for d in map(int, _DIMS.value):
      x = _unit_rows(rng, (b, k, d))
      queries = jnp.asarray(_unit_rows(rng, (b, d)))
      valid = jnp.ones((b, k), bool)
      x_torch, q_torch = torch.from_numpy(x), torch.from_numpy(np.array(queries))
      valid_torch = torch.ones((b, k), dtype=torch.bool)

      def run_torch(x_torch=x_torch):
        m = x_torch.mean(dim=1)
        return m + torch.randn_like(m) * _SIGMA

      def run_torch_same_work(x_torch=x_torch, q_torch=q_torch, valid_torch=valid_torch, k=k):
        scale = torch.clamp(1.0 / x_torch.norm(dim=-1), max=1.0) * valid_torch
        m = torch.einsum("bk,bkd->bd", scale, x_torch) / k
        m = m + torch.randn_like(m) * _SIGMA
        q = q_torch / q_torch.norm(dim=-1, keepdim=True)
        return (_INTERPOLATION * m + (1 - _INTERPOLATION) * q)[:, None]

      def run_numpy(x=x, d=d):
        m = x.mean(axis=1)
        return m + rng.standard_normal((b, d)) * _SIGMA

      contenders = {"torch": run_torch, "same": run_torch_same_work, "numpy": run_numpy}
      inputs = {dtype: jnp.asarray(x, dtype) for dtype in (jnp.float32, jnp.bfloat16)}
      for dtype, neighbors in inputs.items():
        contenders[dtype] = (
            lambda neighbors=neighbors, queries=queries, valid=valid: aggregate_lib.aggregate(
                neighbors, valid, queries, noise_keys, _SIGMA, _INTERPOLATION).block_until_ready())
      seconds = _interleaved_medians(contenders, reps, warmup)
      for dtype, neighbors in inputs.items():
        ours_s = seconds[dtype]
        input_bandwidth = neighbors.size * neighbors.dtype.itemsize / ours_s
        is_f32 = dtype == jnp.float32
        mark = "" if is_f32 else "*"
        rows.append((
            str(k), str(d), jnp.dtype(dtype).name,
            f"{b / ours_s:,.0f}",
            f"{b / seconds['torch']:,.0f}" if is_f32 else "-",
            f"{b / seconds['same']:,.0f}" if is_f32 else "-",
            f"{b / seconds['numpy']:,.0f}" if is_f32 else "-",
            f"{seconds['torch'] / ours_s:.2f}{mark}",
            f"{seconds['same'] / ours_s:.2f}{mark}",
            f"{seconds['numpy'] / ours_s:.2f}{mark}",
            f"{input_bandwidth / 1e9:.2f}",
            f"{input_bandwidth / copy_bandwidth:.3f}",
        ))
      del inputs, x, x_torch

  print(_header(copy_bandwidth, keys_seconds))
  print()
  print(" ".join(c.rjust(w) for c, w in zip(columns, widths)))
  print(" ".join("-" * w for w in widths))
  for row in rows:
    print(" ".join(c.rjust(w) for c, w in zip(row, widths)))
  print()
  print("torch: the authors' aggregation (mean + noise, no clip); same-work: torch doing what ours"
        " does (clip, mask, /k, noise, interpolation).")
  print("* bfloat16 rows: ratios are against the float32 peers of the same (k, d).")
  print("ratios > 1 mean ours is faster.")
  print(load.summary())


if __name__ == "__main__":
  app.run(main)
