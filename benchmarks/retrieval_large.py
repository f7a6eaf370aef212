"""Private k-NN over a table larger than the other benchmarks': ours (host) against faiss (a).

What is measured: N = 10^7 unit-norm float32 rows of d = 384 (15.4 GB, 64% of this machine's
memory), B = 256 queries, k = 16, q = 0.01, as in benchmarks/retrieval.py, by

- ours, host: `host.HostRetriever` over the `EmbeddingStore`, read in place (memory-mapped
  shards of 10^6 rows; the kernel scans them, nothing is copied);
- faiss (a): the DP-RDM authors' search, faiss `IndexFlatIP` holding the rows (added in one call:
  shard by shard, faiss's storage grows by doubling and peaks at twice the table), one `search`
  per query with `IDSelectorBatch` of our subsample's ids (computed untimed with
  `subsample.membership`); building the selector and searching are timed.

The table does not fit in memory twice, so unlike benchmarks/retrieval.py the two run one after
the other, each in a process of its own (ours first, with the store's pages in the page cache;
then faiss, whose copy of the rows evicts them): each figure is the median of --reps passes after
--warmup, and the ratio compares medians taken minutes apart on the same machine. Peak memory is
each process's VmHWM over the timed passes (reset after the warm-up), against the raw table.
The script checks that both return the same ids slot by slot (ties within --tie_tolerance aside).

  python benchmarks/retrieval_large.py                 # ~25 min, most of it writing the store
  python benchmarks/retrieval_large.py --n=1000000     # a 2-minute check

The store is written once to --workdir (default: TMPDIR) by `EmbeddingStore.write_shards`, one
shard in memory at a time, and kept there (--keep) or deleted at the end.
"""

import datetime
import multiprocessing
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import machine_info  # benchmarks/machine_info.py, beside this script
import retrieval_common as common  # benchmarks/common.py

_N = flags.DEFINE_integer("n", 10_000_000, "Rows N.")
_DIM = flags.DEFINE_integer("dim", 384, "Embedding size d.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 1_000_000, "Rows per store shard.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed passes per contender (median taken).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed passes before timing.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the store goes (default: TMPDIR).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the store (and reuse one found there).")
_GIB = 2**30


def _write(directory: pathlib.Path, n: int, d: int, shard_rows: int, seed: int) -> float:
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  shards = ((np.arange(s, min(s + shard_rows, n)),
             machine_info.unit_rows(np.random.default_rng([seed, s]), (min(shard_rows, n - s), d)))
            for s in range(0, n, shard_rows))
  store_lib.EmbeddingStore.write_shards(directory, shards, d)
  return time.perf_counter() - start


def _contender(conn, kind: str, spec: dict):
  """One process: sets up `kind`, runs the passes, sends times, memory and the result."""
  from dprdm_jax.privacy import keys  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import host  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  store = store_lib.EmbeddingStore(spec["store"], verify=False)
  b, k, q, queries = spec["b"], spec["k"], spec["q"], spec["queries"]
  sub_keys = keys.query_keys(spec["seed"], 0, b, keys.Stream.SUBSAMPLE)
  base = machine_info.process_memory()["VmRSS"]
  start = time.perf_counter()
  if kind == "ours":
    retriever = host.HostRetriever(store)

    def run():
      found = retriever.retrieve(queries, sub_keys, q, k)
      return found.ids.astype(np.int64), found.scores, found.valid
  else:
    import faiss  # pylint: disable=g-import-not-at-top
    n = len(store)
    sampled = common.sampled_ids(n, b, spec["seed"], q)  # before faiss's copy
    # One add of the whole table: faiss grows its storage by doubling, so adding shard by shard
    # peaks at twice the table (killed for memory here at N = 10^7). The rows go through a
    # temporary memory-mapped file, whose pages the page cache can drop.
    whole_path = pathlib.Path(spec["store"]) / "faiss-rows.tmp"
    whole = np.lib.format.open_memmap(whole_path, "w+", np.float32, (n, store.dim))
    start_row = 0
    for _, rows in store.shards:
      whole[start_row:start_row + len(rows)] = rows
      start_row += len(rows)
    index = faiss.IndexFlatIP(store.dim)
    index.add(whole)
    del whole, store
    whole_path.unlink()

    def run():
      out_ids = np.full((b, k), -1, np.int64)
      out_scores = np.full((b, k), -np.inf, np.float32)
      for i in range(b):
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(sampled[i]))
        scores, found = index.search(queries[i:i + 1], k, params=params)
        out_ids[i], out_scores[i] = found[0], scores[0]
      return out_ids, out_scores, out_ids >= 0
  setup = time.perf_counter() - start
  for _ in range(spec["warmup"]):
    run()
  machine_info.reset_peak_memory()
  seconds = []
  for _ in range(spec["reps"]):
    start = time.perf_counter()
    result = run()
    seconds.append(time.perf_counter() - start)
  conn.send(dict(setup=setup, seconds=seconds, base=base,
                 peak=machine_info.process_memory()["VmHWM"], result=result))
  conn.close()


def _run(kind: str, spec: dict) -> dict:
  context = multiprocessing.get_context("spawn")
  parent, child = context.Pipe()
  process = context.Process(target=_contender, args=(child, kind, spec), daemon=True)
  process.start()
  child.close()
  out = parent.recv()
  process.join()
  return out


def main(argv):
  del argv
  n, d, b = _N.value, _DIM.value, common.BATCH.value
  k, q, seed = common.NEIGHBORS.value, common.SAMPLING_RATE.value, common.SEED.value
  workdir = pathlib.Path(_WORKDIR.value or tempfile.gettempdir())
  directory = workdir / f"retrieval-large-{n}x{d}-{seed}"
  load = machine_info.BackgroundLoad.started()  # the contenders, child processes, not counted
  write_seconds = None
  if not (directory / "manifest.json").exists():
    shutil.rmtree(directory, ignore_errors=True)
    write_seconds = _write(directory, n, d, _SHARD_ROWS.value, seed)
  spec = dict(store=str(directory), b=b, k=k, q=q, seed=seed, reps=_REPS.value,
              warmup=_WARMUP.value,
              queries=machine_info.unit_rows(np.random.default_rng([seed, 1, d]), (b, d)))
  try:
    results = {}
    for kind in ("ours", "faiss"):
      results[kind] = _run(kind, spec)
      print(f"{kind}: passes of {[round(x, 3) for x in results[kind]['seconds']]} s, peak "
            f"{results[kind]['peak'] / _GIB:.2f} GiB", file=sys.stderr, flush=True)
  finally:
    if not _KEEP.value:
      shutil.rmtree(directory, ignore_errors=True)
  raw = n * d * 4
  print("Private k-NN over a large table (benchmarks/retrieval_large.py)")
  print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPUs, {machine_info.cpu_model()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / _GIB:.1f} GiB memory")
  print(f"N = {n:,} unit-norm float32 rows of d = {d} ({raw / _GIB:.2f} GiB raw, store in shards "
        f"of {_SHARD_ROWS.value:,}), B = {b}, k = {k}, q = {q}; median of {_REPS.value} passes "
        f"after {_WARMUP.value} warm-up, one contender at a time, each in its own process")
  if write_seconds is not None:
    print(f"store written in {write_seconds:.0f} s (EmbeddingStore.write_shards)")
  print()
  print(f"{'contender':>22} {'q/s':>9} {'ms/query':>9} {'setup s':>8} {'peak GiB':>9} "
        f"{'(peak-libs)/raw':>15}")
  qps = {}
  for kind, label in (("ours", "ours, host"), ("faiss", "faiss (a) given ids")):
    r = results[kind]
    median = statistics.median(r["seconds"])
    qps[kind] = b / median
    print(f"{label:>22} {qps[kind]:9.2f} {median * 1e3 / b:9.2f} {r['setup']:8.1f} "
          f"{r['peak'] / _GIB:9.2f} {(r['peak'] - r['base']) / raw:15.2f}")
  print(f"ratio ours / faiss (a): {qps['ours'] / qps['faiss']:.2f}")
  differ, mismatches, gap = common.compare(
      results["ours"]["result"], results["faiss"]["result"], common.TIE_TOLERANCE.value)
  print(f"same results: {differ} of {b * k} slots differ, {mismatches} beyond ties; "
        f"max |score diff| {gap:.1e}")
  print("peak = VmHWM over the timed passes; libs = resident before the table was opened; "
        "ours' peak counts the store's mapped pages it touched (file-backed, evictable)")
  print(load.summary())


if __name__ == "__main__":
  app.run(main)
