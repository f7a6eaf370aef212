"""Input pipelines over a Source: shuffled training batches, and every record once, in order.

Training (`TrainBatches`): epoch e visits the records in the order of a permutation drawn from
(seed, e); step s reads the global batch s % steps_per_epoch of epoch s // steps_per_epoch, and
each process reads its own contiguous slice of it. Any step's batch is a function of (seed, s), so
a run resumed at step s reads exactly what an uninterrupted run would have, on any process count
that divides the global batch. The last partial batch of an epoch is dropped.

In order (`ordered_chunks`): the positions 0..N-1 in chunks of a fixed size, chunk i belonging to
process i % process_count; the embedding job writes one file per chunk and skips the ones done.
"""

import queue
import threading
from typing import Callable, Iterator, Optional

import numpy as np

from dprdm_jax.data import source as source_lib


class TrainBatches:
  """An endless, deterministic, resumable stream of this process's share of global batches."""

  def __init__(self, source: source_lib.Source, global_batch_size: int, seed: int,
               start_step: int = 0, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2,
               transform: Optional[Callable[[dict], dict]] = None):
    """Reads from `start_step` on; `transform` runs on each local batch in the prefetch thread."""
    if global_batch_size < 1 or global_batch_size % process_count:
      raise source_lib.SourceError(
          f"global batch size {global_batch_size} must be a positive multiple of the process "
          f"count {process_count}")
    if len(source) < global_batch_size:
      raise source_lib.SourceError(
          f"{source.name} has {len(source)} records, fewer than one global batch "
          f"({global_batch_size})")
    if not 0 <= process_index < process_count or start_step < 0:
      raise source_lib.SourceError(f"bad process index {process_index} of {process_count} or "
                                   f"start step {start_step}")
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch = len(source) // global_batch_size
    self.seed = seed
    self.step = start_step
    self._process_index = process_index
    self._prefetch = prefetch
    self._transform = transform or (lambda batch: batch)
    self._epoch_cache = (-1, None)

  def positions(self, step: int) -> np.ndarray:
    """The source positions this process reads at global step `step`."""
    epoch, within = divmod(step, self.steps_per_epoch)
    if self._epoch_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch_cache = (epoch, rng.permutation(len(self.source)))
    start = within * self.global_batch_size + self._process_index * self.local_batch_size
    return self._epoch_cache[1][start:start + self.local_batch_size]

  def __iter__(self) -> Iterator[dict]:
    """Yields local batches from self.step on, read `prefetch` batches ahead in a thread.

    self.step counts the batches handed out, so it is the step to resume from.
    """
    ready: queue.Queue = queue.Queue(maxsize=max(self._prefetch, 1))
    stop = threading.Event()

    def produce(step):
      try:
        while not stop.is_set():
          ready.put(self._transform(self.source.read(self.positions(step))))
          step += 1
      except Exception as e:  # pylint: disable=broad-except
        ready.put(e)

    worker = threading.Thread(target=produce, args=(self.step,), daemon=True)
    worker.start()
    try:
      while True:
        batch = ready.get()
        if isinstance(batch, Exception):
          raise batch
        self.step += 1
        yield batch
    finally:
      stop.set()
      while worker.is_alive():
        try:
          ready.get_nowait()
        except queue.Empty:
          worker.join(0.01)


def ordered_chunks(size: int, chunk_size: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[tuple[int, np.ndarray]]:
  """(chunk number, positions) of this process's chunks of 0..size-1, in order."""
  if chunk_size < 1:
    raise source_lib.SourceError(f"chunk size must be >= 1, got {chunk_size}")
  for i, start in enumerate(range(0, size, chunk_size)):
    if i % process_count == process_index:
      yield i, np.arange(start, min(start + chunk_size, size))
