"""Private k-NN retrieval: ours (device and host back-ends) against the DP-RDM authors' faiss.

What is measured: for each table size (N records, d dimensions; by default N in {10^4, 10^5, 10^6}
at d = 512, and d in {128, 512} at N = 10^5), queries per second of answering the same B = 256
unit-norm queries with the top k = 16 records of each query's own Poisson subsample at rate
q = 0.01, over the same unit-norm float32 rows (record ids 0..N-1), by:

- ours, device: `dprdm_jax.retrieval.device.private_knn` (jitted: matmul scores, keyed
  membership, mask, `jax.lax.top_k`) on the default JAX device (a CPU here), --chunk queries per
  call, so that the (chunk, N) score and hash matrices fit in memory; the table is a
  `DeviceTable.from_store`.
- ours, host: `dprdm_jax.retrieval.host.HostRetriever` over the store (memory-mapped, no index),
  method "auto", which at q <= host.SCAN_MAX_RATE is the scan: one pass over the rows in jobs of
  rows on one thread per core (the caller's and pool threads), each job one call of the compiled
  kernel (`retrieval/scan_kernel.py`) that hashes every query's subsample (one Threefry block per
  4 records) and computes one float32 dot product per sampled pair only, keeping each query's k
  best.
- faiss (a), the authors' method given our subsample: faiss-cpu `IndexFlatIP` over the same rows,
  one `search` per query with `SearchParameters(sel=IDSelectorBatch(sampled_ids))`, where
  sampled_ids is that query's subsample computed with our `subsample.membership` (untimed, before
  the run). Timed: building the selector and searching.
- faiss (b), the authors' method whole: as (a), but each query's subsample is drawn their way,
  `np.flatnonzero(rng.random(N) < q)`, inside the timed loop. Its subsamples differ from ours, so
  only its speed is compared.

Both of ours and faiss (a) see the same subsample per query; the script checks that their ids agree
slot by slot, a slot counting as a mismatch only where the ids differ and the two scores differ by
more than --tie_tolerance (a tie may be broken either way).

Each contender runs in its own process (multiprocessing "spawn"), so that its memory can be told
apart: the script reports each process's resident set (VmRSS, VmHWM from /proc/self/status) after
importing the libraries, the peak while loading the rows and building its index, the resident set
after that, and the peak while answering queries (the high-water mark is reset between the phases
through /proc/self/clear_refs), against the raw table size N*d*4 bytes. The rows are generated once
per table, written as an `EmbeddingStore` in a temporary directory by a separate process (whose
peak is reported too), and read from there by every contender.

Timing: the contenders of one table are already set up and warm (--warmup untimed passes, which
compile ours), then called in turn, pass after pass (--reps passes, --large_reps for N >=
--large_n), so that a slow spell of the shared machine hits all of them; each figure is the median
wall time of a whole pass over the B queries. "cores" is the process CPU time per wall second of
those passes. A last table breaks each contender's pass down by stage: ours, device, by timing each
stage of `private_knn` jitted on its own on one chunk (the fused function can take less than the
sum); ours, host, by timing the kernel calls inside `retrieve` (summed over the worker threads;
the rest is the merge of the jobs' lists and the gather of the neighbours' rows); faiss (a) by
timing the selector construction alone (the rest is the search).

Run from the repository root, with the peer installed (`pip install faiss-cpu`):

  python benchmarks/retrieval.py                                    # the full run, ~5 min
  python benchmarks/retrieval.py --sizes=10000 --dim_sweep= --reps=3  # a quick check, ~20 s

on a 2-core machine. N = 10^6 takes most of it, and about 6 GiB of memory while the three
contenders hold their tables. benchmarks/retrieval_large.py runs N = 10^7, which does not fit
three times.
"""

import datetime
import functools
from importlib import metadata
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time

from absl import app
from absl import flags
from absl import logging
import faiss
import jax
import jax.numpy as jnp
import numpy as np

import machine_info  # benchmarks/machine_info.py, beside this script
import retrieval_common as common  # benchmarks/common.py
from dprdm_jax.privacy import keys
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import host
from dprdm_jax.retrieval import scan_kernel
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample

_SIZES = flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "Table sizes N at --dim.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding size d for --sizes.")
_DIM_SWEEP = flags.DEFINE_list("dim_sweep", ["128", "512"],
                               "Embedding sizes d also run at N = --dim_sweep_n (empty: none).")
_DIM_SWEEP_N = flags.DEFINE_integer("dim_sweep_n", 100_000, "N of the --dim_sweep tables.")
_CHUNK = flags.DEFINE_integer("chunk", 128, "Queries per private_knn call in ours, device.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed passes per contender (median taken).")
_LARGE_REPS = flags.DEFINE_integer("large_reps", 3, "Timed passes for tables of N >= --large_n.")
_LARGE_N = flags.DEFINE_integer("large_n", 1_000_000, "Tables this large get --large_reps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed passes per contender before timing.")
_PROFILE_REPS = flags.DEFINE_integer("profile_reps", 3, "Timed calls per stage in the breakdown.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the temporary stores go (default: TMPDIR).")

_CONTENDERS = ("device", "host", "faiss_a", "faiss_b")
_LABELS = {"device": "ours, device", "host": "ours, host", "faiss_a": "faiss (a) given ids",
           "faiss_b": "faiss (b) + own draw"}
_GIB = 2**30


# ----------------------------------------------------------------------------------------------
# Process memory.


# ----------------------------------------------------------------------------------------------
# The contenders, each in its own process.


class _Device:
  """Ours, device back-end: chunks of `private_knn` over a `DeviceTable` of the store."""

  def __init__(self, spec: dict):
    store = store_lib.EmbeddingStore(spec["store"], verify=False)
    self._table = device.DeviceTable.from_store(store)
    del store  # unmaps the store's file
    self._k, self._chunk = spec["k"], spec["chunk"]
    self._q = spec["q"]
    sub_keys = keys.query_keys(spec["seed"], 0, len(spec["queries"]), keys.Stream.SUBSAMPLE)
    starts = range(0, len(spec["queries"]), self._chunk)
    self._chunks = [(jnp.asarray(spec["queries"][s:s + self._chunk]), sub_keys[s:s + self._chunk])
                    for s in starts]
    self._out = None

  def run(self):
    self._out = [device.private_knn(self._table, q, sub_keys, self._q, self._k)
                 for q, sub_keys in self._chunks]
    jax.block_until_ready(self._out)

  def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.concatenate([np.asarray(o.ids, np.int64) for o in self._out]),
            np.concatenate([np.asarray(o.scores) for o in self._out]),
            np.concatenate([np.asarray(o.valid) for o in self._out]))

  def profile(self, reps: int) -> list[tuple[str, float]]:
    """Seconds per pass of each stage of `private_knn`, each jitted and timed on its own."""
    table, k = self._table, self._k
    keep = jnp.asarray(subsample.limit(self._q))
    # The table goes in as an argument: a closed-over array would be compiled in as a constant.
    scores = jax.jit(lambda e, q: jnp.einsum("bd,nd->bn", q.astype(jnp.float32),
                                             e.astype(jnp.float32)))
    member = jax.jit(lambda sub_keys, ids, present: subsample.membership(sub_keys, ids, keep)
                     & present)
    mask = jax.jit(lambda s, m: jnp.where(m, s, -jnp.inf))
    top_k = jax.jit(functools.partial(jax.lax.top_k, k=k))
    q, sub_keys = self._chunks[0]
    run_scores = lambda: scores(table.embeddings, q).block_until_ready()
    run_member = lambda: member(sub_keys, table.ids, table.present).block_until_ready()
    s, m = run_scores(), run_member()
    masked = mask(s, m).block_until_ready()
    jax.block_until_ready(top_k(masked))
    passes = len(self._chunks)
    timed = lambda fn: passes * machine_info.median_seconds(fn, reps)
    return [
        ("matmul scores (chunk, d) x (d, N)", timed(run_scores)),
        ("keyed membership (chunk, N)", timed(run_member)),
        ("mask (where)", timed(lambda: mask(s, m).block_until_ready())),
        ("lax.top_k over (chunk, N)", timed(lambda: jax.block_until_ready(top_k(masked)))),
    ]


class _Host:
  """Ours, host back-end: `HostRetriever` over the store (memory-mapped), no index."""

  def __init__(self, spec: dict):
    store = store_lib.EmbeddingStore(spec["store"], verify=False)
    self._retriever = host.HostRetriever(store)
    self._queries, self._k, self._q = spec["queries"], spec["k"], spec["q"]
    self._keys = keys.query_keys(spec["seed"], 0, len(self._queries), keys.Stream.SUBSAMPLE)
    self._n = len(store)
    self._out = None

  def run(self):
    self._out = self._retriever.retrieve(self._queries, self._keys, self._q, self._k)

  def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return self._out.ids.astype(np.int64), self._out.scores, self._out.valid

  def profile(self, reps: int) -> list[tuple[str, float]]:
    """Seconds per pass inside `retrieve` ("scan" at q <= host.SCAN_MAX_RATE): its stages.

    The kernel calls (`scan_kernel.scan_block`: hashing, membership, scoring and the per-job k
    best, on worker threads, summed over them) are wrapped with a timer; the rest of the pass is
    the merge of the jobs' lists and the gather of the neighbours' rows.
    """
    spent = [0.0]
    lock = threading.Lock()
    original = scan_kernel.scan_block

    def timed(*args):
      start = time.perf_counter()
      original(*args)
      with lock:
        spent[0] += time.perf_counter() - start

    parts = []
    scan_kernel.scan_block = timed
    try:
      for _ in range(reps):
        spent[0] = 0.0
        start = time.perf_counter()
        self.run()
        parts.append((spent[0], time.perf_counter() - start))
    finally:
      scan_kernel.scan_block = original
    kernel, total = (statistics.median(p[i] for p in parts) for i in range(2))
    workers = host._WORKERS  # pylint: disable=protected-access
    return [
        (f"scan kernel: hash, score, k best ({workers} threads, summed)", kernel),
        ("whole pass (wall)", total),
    ]


class _Faiss:
  """The authors' method: faiss IndexFlatIP, one filtered search per query."""

  def __init__(self, spec: dict):
    store = store_lib.EmbeddingStore(spec["store"], verify=False)
    self._n, d = len(store), store.dim
    self._index = faiss.IndexFlatIP(d)
    self._index.add(np.ascontiguousarray(store.embeddings, np.float32))
    del store  # faiss holds its own copy; this unmaps the store's file
    self._queries, self._k, self._q = spec["queries"], spec["k"], spec["q"]
    self._sampled = spec["sampled"]
    self._rng = np.random.default_rng(spec["seed"])
    shape = (len(self._queries), self._k)
    # (ids, scores) of the last pass of (a) and of (b): only (a)'s are compared with ours.
    self._out = {m: (np.zeros(shape, np.int64), np.zeros(shape, np.float32)) for m in "ab"}

  def _search(self, out, i: int, sampled_ids: np.ndarray):
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(sampled_ids))
    scores, ids = self._index.search(self._queries[i:i + 1], self._k, params=params)
    out[0][i], out[1][i] = ids[0], scores[0]

  def run_a(self):
    for i, sampled_ids in enumerate(self._sampled):
      self._search(self._out["a"], i, sampled_ids)

  def run_b(self):
    for i in range(len(self._queries)):
      self._search(self._out["b"], i, np.flatnonzero(self._rng.random(self._n) < self._q))

  def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, scores = self._out["a"]
    return ids.copy(), scores.copy(), ids >= 0

  def profile(self, reps: int) -> list[tuple[str, float]]:
    """Seconds per pass: the selectors alone, and the authors' subsample draws alone."""
    build = lambda: [faiss.IDSelectorBatch(s) for s in self._sampled]
    draw = lambda: [np.flatnonzero(self._rng.random(self._n) < self._q)
                    for _ in range(len(self._queries))]
    total = machine_info.median_seconds(self.run_a, reps)
    selectors = machine_info.median_seconds(build, reps)
    return [
        ("(a) IDSelectorBatch construction", selectors),
        ("(a) IndexFlatIP.search with the selector", max(0.0, total - selectors)),
        ("(b) rng.random(N) < q, flatnonzero", machine_info.median_seconds(draw, reps)),
    ]


def _worker(conn, kind: str, spec: dict):
  """A contender's process: answers (command, argument) messages from the parent on `conn`."""
  logging.set_verbosity(logging.WARNING)
  base = machine_info.process_memory()
  start = time.perf_counter()
  contender = {"device": _Device, "host": _Host, "faiss": _Faiss}[kind](spec)
  setup_seconds = time.perf_counter() - start
  conn.send({"base": base, "setup": machine_info.process_memory(), "setup_seconds": setup_seconds})
  while True:
    command, argument = conn.recv()
    if command == "stop":
      conn.send(None)
      return
    if command == "reset_peak":
      conn.send(machine_info.reset_peak_memory())
    elif command == "run":
      fn = getattr(contender, argument)
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      conn.send((time.perf_counter() - wall, time.process_time() - cpu))
    elif command == "result":
      conn.send((contender.result(), machine_info.process_memory()))
    elif command == "profile":
      conn.send(contender.profile(argument))


def _write_store(conn, directory: str, n: int, d: int, seed: int):
  """The data-writing process: N random unit rows as an EmbeddingStore, one shard of 2**18 rows
  in memory at a time (`write_shards`); sends seconds, peak."""
  start = time.perf_counter()
  shard = 1 << 18
  store_lib.EmbeddingStore.write_shards(directory, (
      (np.arange(s, min(n, s + shard)),
       machine_info.unit_rows(np.random.default_rng([seed, n, d, s]), (min(shard, n - s), d)))
      for s in range(0, n, shard)), d)
  conn.send((time.perf_counter() - start, machine_info.process_memory()["VmHWM"]))


class _Process:
  """A spawned process running `target(conn, *args)`, with a blocking request-reply channel."""

  def __init__(self, target, *args):
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=target, args=(child, *args), daemon=True)
    self._process.start()
    child.close()

  def receive(self):
    return self._conn.recv()

  def ask(self, command: str, argument=None):
    self._conn.send((command, argument))
    return self._conn.recv()

  def join(self):
    self._process.join()
    self._conn.close()


# ----------------------------------------------------------------------------------------------
# One table.


def _run_table(n: int, d: int, workdir: str) -> dict:
  """Writes one table, runs every contender on it, returns timings, memory, checks, breakdown."""
  b, k, q, chunk, seed = (common.BATCH.value, common.NEIGHBORS.value, common.SAMPLING_RATE.value,
                          _CHUNK.value, common.SEED.value)
  reps = _LARGE_REPS.value if n >= _LARGE_N.value else _REPS.value
  directory = tempfile.mkdtemp(prefix=f"retrieval-{n}x{d}-", dir=workdir)
  try:
    writer = _Process(_write_store, os.path.join(directory, "store"), n, d, seed)
    write_seconds, write_peak = writer.receive()
    writer.join()
    queries = machine_info.unit_rows(np.random.default_rng([seed, 1, d]), (b, d))
    start = time.perf_counter()
    sampled = common.sampled_ids(n, b, seed, q)
    sampling_seconds = time.perf_counter() - start
    spec = dict(store=os.path.join(directory, "store"), queries=queries, k=k, q=q, chunk=chunk,
                seed=seed)
    workers, setups = {}, {}
    for kind in ("device", "host", "faiss"):
      worker_spec = dict(spec, sampled=sampled) if kind == "faiss" else spec
      workers[kind] = _Process(_worker, kind, worker_spec)
      setups[kind] = workers[kind].receive()  # one at a time: setups do not overlap
    calls = {"device": ("device", "run"), "host": ("host", "run"), "faiss_a": ("faiss", "run_a"),
             "faiss_b": ("faiss", "run_b")}
    for _ in range(_WARMUP.value):
      for kind, method in calls.values():
        workers[kind].ask("run", method)
    peak_reset = all([w.ask("reset_peak") for w in workers.values()])
    times = {name: [] for name in calls}
    for _ in range(reps):
      for name, (kind, method) in calls.items():
        times[name].append(workers[kind].ask("run", method))
    results, memory = {}, {}
    for kind, worker in workers.items():
      results[kind], memory[kind] = worker.ask("result")
    breakdown = {kind: worker.ask("profile", _PROFILE_REPS.value)
                 for kind, worker in workers.items()}
    for worker in workers.values():
      worker.ask("stop")
    for worker in workers.values():
      worker.join()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  tolerance = common.TIE_TOLERANCE.value
  checks = {pair: common.compare(results[pair[0]], results[pair[1]], tolerance)
            for pair in (("device", "host"), ("device", "faiss"), ("host", "faiss"))}
  invalid = {kind: int((~r[2]).sum()) for kind, r in results.items()}
  return dict(n=n, d=d, reps=reps, write_seconds=write_seconds, write_peak=write_peak,
              sampling_seconds=sampling_seconds,
              sample_sizes=[len(s) for s in sampled], setups=setups, memory=memory,
              peak_reset=peak_reset, invalid=invalid, checks=checks, breakdown=breakdown,
              seconds={name: statistics.median(w for w, _ in t) for name, t in times.items()},
              spread={name: (max(w for w, _ in t) - min(w for w, _ in t)) /
                      statistics.median(w for w, _ in t) for name, t in times.items()},
              cores={name: sum(c for _, c in t) / sum(w for w, _ in t)
                     for name, t in times.items()})


# ----------------------------------------------------------------------------------------------
# Report.


def _table(columns, widths, rows) -> list[str]:
  lines = [" ".join(c.rjust(w) for c, w in zip(columns, widths)),
           " ".join("-" * w for w in widths)]
  lines += [" ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  return lines


def _header() -> list[str]:
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
  large = f"{_LARGE_REPS.value} for N >= {_LARGE_N.value:,}"
  return [
      "Private k-NN retrieval throughput (benchmarks/retrieval.py)",
      f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"machine: {os.cpu_count()} CPUs (nproc {affinity}), {machine_info.cpu_model()}",
      f"versions: python {platform.python_version()}, numpy {np.__version__}, "
      f"jax {jax.__version__}, jaxlib {metadata.version('jaxlib')}, "
      f"scann {metadata.version('scann')}, faiss-cpu {metadata.version('faiss-cpu')}",
      f"jax devices: {', '.join(str(x) for x in jax.devices())}; "
      f"faiss OpenMP threads: {faiss.omp_get_max_threads()}",
      f"B = {common.BATCH.value} queries per pass, k = {common.NEIGHBORS.value}, "
      f"q = {common.SAMPLING_RATE.value}, unit-norm float32 rows (ids 0..N-1) and queries; "
      f"ours, device: {_CHUNK.value} queries per private_knn call",
      f"median of {_REPS.value} passes ({large}) after {_WARMUP.value} warm-up pass(es), "
      "contenders called in turn, each in its own process",
      "units: q/s = queries per second (B / median pass wall time); cores = process CPU seconds "
      "per wall second; GiB = 2**30 bytes; raw = N*d*4 bytes",
  ]


def _report(tables: list[dict]) -> list[str]:
  out = _header() + [""]
  b = common.BATCH.value

  out.append("Throughput (ratios: ours q/s / faiss q/s, > 1 means ours is faster)")
  rows = []
  for t in tables:
    qps = {name: b / s for name, s in t["seconds"].items()}
    for name in _CONTENDERS:
      ours = name in ("device", "host")
      rows.append((
          f"{t['n']:,}", str(t["d"]), _LABELS[name], f"{qps[name]:,.1f}",
          f"{t['seconds'][name] * 1e3 / b:.2f}", f"{t['spread'][name] * 100:.0f}%",
          f"{t['cores'][name]:.2f}",
          f"{qps[name] / qps['faiss_a']:.2f}" if ours else "-",
          f"{qps[name] / qps['faiss_b']:.2f}" if ours else "-"))
  out += _table(("N", "d", "contender", "q/s", "ms/query", "spread", "cores", "/faiss(a)",
                 "/faiss(b)"), (9, 4, 20, 10, 9, 6, 5, 9, 9), rows)
  out.append("spread = (slowest - fastest pass) / median pass.")

  by_key = {(t["n"], t["d"]): t for t in tables}
  growth = []
  sizes = sorted(n for n, d in by_key if d == _DIM.value)
  for small, large in zip(sizes, sizes[1:]):
    growth.append((f"N {small:,} -> {large:,} (d = {_DIM.value})", by_key[(small, _DIM.value)],
                   by_key[(large, _DIM.value)], large / small))
  dims = sorted(d for n, d in by_key if n == _DIM_SWEEP_N.value)
  for small, large in zip(dims, dims[1:]):
    growth.append((f"d {small} -> {large} (N = {_DIM_SWEEP_N.value:,})",
                   by_key[(_DIM_SWEEP_N.value, small)], by_key[(_DIM_SWEEP_N.value, large)],
                   large / small))
  if growth:
    out += ["", "Growth: pass time at the larger size / at the smaller (raw data grows by 'x')"]
    rows = [(label, f"{factor:g}", *(f"{t1['seconds'][c] / t0['seconds'][c]:.2f}"
                                     for c in _CONTENDERS))
            for label, t0, t1, factor in growth]
    out += _table(("change", "x", "device", "host", "faiss (a)", "faiss (b)"),
                  (30, 5, 8, 8, 9, 9), rows)

  out += ["", "Memory per contender process, GiB (VmRSS/VmHWM; rss after setup split anon+file)"]
  rows = []
  for t in tables:
    raw = t["n"] * t["d"] * 4
    for kind, label in (("device", "ours, device"), ("host", "ours, host"),
                        ("faiss", "faiss (a) and (b)")):
      setup, after = t["setups"][kind], t["memory"][kind]
      rss = setup["setup"]
      rows.append((
          f"{t['n']:,}", str(t["d"]), label, f"{raw / _GIB:.3f}",
          f"{setup['base'].get('VmRSS', 0) / _GIB:.3f}", f"{setup['setup_seconds']:.1f}",
          f"{rss['VmHWM'] / _GIB:.3f}",
          f"{rss.get('RssAnon', 0) / _GIB:.3f}+{rss.get('RssFile', 0) / _GIB:.3f}",
          f"{after['VmHWM'] / _GIB:.3f}",
          f"{(after['VmHWM'] - setup['base'].get('VmRSS', 0)) / raw:.2f}"))
  out += _table(("N", "d", "contender", "raw", "libs", "setup s", "setup pk", "rss anon+file",
                 "query pk", "(pk-libs)/raw"), (9, 4, 17, 6, 6, 7, 8, 13, 8, 13), rows)
  out.append("libs = resident after imports, before the rows; setup pk = peak while loading the "
             "rows and building; query pk = peak over the warm passes (high-water mark reset "
             + ("after warm-up)" if all(t["peak_reset"] for t in tables) else
                "NOT reset: /proc/self/clear_refs refused, so it includes setup)"))
  out.append("store writing (one process per table: generate rows, EmbeddingStore.write_shards): " +
             "; ".join(f"N = {t['n']:,}, d = {t['d']}: {t['write_seconds']:.1f} s, peak "
                       f"{t['write_peak'] / _GIB:.2f} GiB" for t in tables))

  out += ["", f"Same results (same subsample per query; {common.BATCH.value} x "
          f"{common.NEIGHBORS.value} slots;"
          f" a differing slot is a mismatch unless the scores agree within "
          f"{common.TIE_TOLERANCE.value:g})"]
  rows = []
  names = {"device": "device", "host": "host", "faiss": "faiss(a)"}
  for t in tables:
    for (x, y), (differ, mismatch, gap) in t["checks"].items():
      rows.append((f"{t['n']:,}", str(t["d"]), f"{names[x]} vs {names[y]}", str(differ),
                   str(mismatch), f"{gap:.1e}"))
  out += _table(("N", "d", "pair", "ids differ", "mismatches", "max |score diff|"),
                (9, 4, 20, 10, 10, 16), rows)
  out.append("invalid slots (subsample smaller than k): " + "; ".join(
      f"N = {t['n']:,}, d = {t['d']}: " + ", ".join(f"{names[k]} {v}" for k, v in
                                                    t["invalid"].items()) for t in tables))
  out.append("subsample sizes (our hash, min / mean / max over the queries): " + "; ".join(
      f"N = {t['n']:,}: {min(t['sample_sizes'])} / {statistics.mean(t['sample_sizes']):.0f} / "
      f"{max(t['sample_sizes'])}" for t in tables if t["d"] == _DIM.value or len(tables) == 1))
  out.append("faiss (a)'s subsamples, subsample.membership over all N in the parent (untimed, "
             "with jit compilation): " + "; ".join(
                 f"N = {t['n']:,}, d = {t['d']}: {t['sampling_seconds']:.2f} s" for t in tables))

  out += ["", f"Where the time goes: seconds per pass of B = {common.BATCH.value} queries by "
          "stage "
          f"(median of {_PROFILE_REPS.value}; see the module docstring for how)"]
  rows = []
  for t in tables:
    for kind, label in (("device", "ours, device"), ("host", "ours, host"), ("faiss", "faiss")):
      for stage, seconds in t["breakdown"][kind]:
        rows.append((f"{t['n']:,}", str(t["d"]), label, stage, f"{seconds:.3f}"))
  out += _table(("N", "d", "contender", "stage", "s/pass"), (9, 4, 12, 50, 7), rows)
  out.append(f"device: each stage jitted alone on one chunk of {_CHUNK.value} queries, times "
             f"{math.ceil(common.BATCH.value / _CHUNK.value)} chunks (private_knn fuses them); "
             "host: "
             "kernel calls timed inside retrieve, summed over its worker threads; faiss (a): "
             "search = pass - selectors.")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # hides JAX's note that no TPU is present
  load = machine_info.BackgroundLoad.started()  # the contenders, child processes, not counted
  cells = [(int(n), _DIM.value) for n in _SIZES.value]
  cells += [(_DIM_SWEEP_N.value, int(d)) for d in _DIM_SWEEP.value
            if (_DIM_SWEEP_N.value, int(d)) not in cells]
  tables = []
  for n, d in cells:
    logging.warning("table N = %d, d = %d", n, d)
    tables.append(_run_table(n, d, _WORKDIR.value))
  print("\n".join(_report(tables)))
  print(load.summary())


if __name__ == "__main__":
  app.run(main)
