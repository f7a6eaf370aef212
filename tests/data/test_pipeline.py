"""The input pipeline: deterministic, resumable, split across processes, every record per epoch."""

import itertools

import numpy as np
import pytest

from dprdm_jax.data import pipeline
from dprdm_jax.data import source as source_lib


def _source(n=103):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  return source_lib.ArraySource(
      name="toy", class_names=("a", "b"), images=images, labels=np.arange(n) % 2,
      captions=np.array([f"record {i}" for i in range(n)], dtype=object),
      ids=np.arange(n, dtype=np.uint32) * 7)


def _take(stream, steps):
  return [batch["id"].copy() for batch in itertools.islice(stream, steps)]


def test_epochs_cover_every_record_once_and_reshuffle():
  stream = pipeline.TrainBatches(_source(), global_batch_size=10, seed=3)
  assert stream.steps_per_epoch == 10
  batches = _take(stream, 20)
  first, second = np.concatenate(batches[:10]), np.concatenate(batches[10:])
  assert len(set(first.tolist())) == 100 and len(set(second.tolist())) == 100
  assert not np.array_equal(first, second)
  assert stream.step == 20


def test_deterministic_and_seeded():
  a = _take(pipeline.TrainBatches(_source(), 10, seed=3), 5)
  b = _take(pipeline.TrainBatches(_source(), 10, seed=3), 5)
  c = _take(pipeline.TrainBatches(_source(), 10, seed=4), 5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_resume_reads_what_an_uninterrupted_run_reads():
  full = _take(pipeline.TrainBatches(_source(), 10, seed=1), 25)
  stream = pipeline.TrainBatches(_source(), 10, seed=1)
  head = _take(stream, 13)
  tail = _take(pipeline.TrainBatches(_source(), 10, seed=1, start_step=stream.step), 12)
  np.testing.assert_array_equal(full, head + tail)


def test_processes_split_the_global_batch():
  whole = _take(pipeline.TrainBatches(_source(), 12, seed=5), 6)
  parts = [_take(pipeline.TrainBatches(_source(), 12, seed=5, process_index=p, process_count=3),
                 6) for p in range(3)]
  for step in range(6):
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), whole[step])
    assert all(len(part[step]) == 4 for part in parts)


def test_transform_runs_and_errors_surface():
  stream = pipeline.TrainBatches(_source(), 10, seed=0,
                                 transform=lambda b: dict(b, image=b["image"] * 0 + 1))
  assert (next(iter(stream))["image"] == 1).all()

  def fail(_):
    raise RuntimeError("decode failed")
  with pytest.raises(RuntimeError, match="decode failed"):
    next(iter(pipeline.TrainBatches(_source(), 10, seed=0, transform=fail)))


def test_bad_settings():
  with pytest.raises(source_lib.SourceError, match="multiple of the process count"):
    pipeline.TrainBatches(_source(), 10, seed=0, process_count=3)
  with pytest.raises(source_lib.SourceError, match="fewer than one global batch"):
    pipeline.TrainBatches(_source(5), 10, seed=0)


def test_ordered_chunks_cover_all_positions_once():
  chunks = [list(pipeline.ordered_chunks(23, 5, p, 2)) for p in range(2)]
  assert [i for i, _ in chunks[0]] == [0, 2, 4] and [i for i, _ in chunks[1]] == [1, 3]
  positions = np.concatenate([p for part in chunks for _, p in part])
  assert sorted(positions.tolist()) == list(range(23))
