"""`dprdm embed`: a dataset split -> embedding stores of its images and of its captions.

OUT/images and OUT/captions are two embedding stores (retrieval/store.py) over the same record
ids, each with the captions as payload: the image tower's embeddings (the values DP-RDM averages)
and the text tower's embeddings of the captions (usable as retrieval keys, README "The embedded
default"). The job embeds the split in chunks of config.embed.chunk_size records; each finished
chunk is written atomically to OUT/chunks/, so a killed job rerun with the same arguments skips
the chunks done and ends with the same stores. Chunk i belongs to process i % process_count, and
within a process each batch is split over the local devices' data axis; once every process has
reached a barrier, process 0 assembles the stores (OUT must be a shared file system on a
multi-host run: `dprdm embed --distributed`).
"""

import functools
import json
import os
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np

from dprdm_jax import errors
from dprdm_jax.data import offline
from dprdm_jax.data import pipeline
from dprdm_jax.data import source as source_lib
from dprdm_jax.encoders import image as image_lib
from dprdm_jax.encoders import linear as linear_lib
from dprdm_jax.retrieval import store as store_lib

KINDS = ("images", "captions")


def open_source(config: ml_collections.ConfigDict, dataset: str,
                split: str) -> source_lib.Source:
  """An offline dataset by name, a folder of images as "folder:PATH" (data/folder.py: split
  "train", at config.data.resolution with config.model.in_channels channels), or a
  tensorflow-datasets dataset (config.data.tfds_dir)."""
  if dataset in offline.NAMES:
    return offline.load(dataset, split, config.data.resolution)
  if dataset.startswith("folder:"):
    from dprdm_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.FolderSource(dataset[len("folder:"):], split, config.data.resolution,
                               config.model.in_channels)
  from dprdm_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.TfdsSource(dataset, split, config.data.resolution,
                                data_dir=config.data.tfds_dir or None)


def _data_sharding(batch_size: int) -> jax.sharding.NamedSharding:
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise errors.InputError(f"embed.batch_size {batch_size} must be a multiple of the "
                            f"{len(devices)} local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


@functools.cache
def load_clip(path: str):
  """The CLIP at `path` (encoders/clip.py), loaded once per process: the text tower, the image
  tower and the evaluation's judge of a real-data config all use the same model."""
  from dprdm_jax.encoders import clip  # pylint: disable=g-import-not-at-top
  return clip.ClipEncoder.load(path)


def open_image_tower(config: ml_collections.ConfigDict):
  """The image encoder named by config.embed.image_tower (`dim`, `encode_images`)."""
  spec = config.embed.image_tower
  if spec == "linear":
    return linear_lib.load(config.encoder.workdir)
  if spec == "contrastive":
    return image_lib.load(config.encoder.workdir, config.embed.batch_size,
                          _data_sharding(config.embed.batch_size))
  if spec.startswith("clip:"):
    return load_clip(spec[len("clip:"):])
  raise errors.InputError(
      f"embed.image_tower must be 'linear', 'contrastive' or 'clip:PATH', got {spec!r}")


def open_text_tower(config: ml_collections.ConfigDict):
  """(text encoder, centre or None) named by config.embed.text_tower: captions and prompts are
  embedded as encoder.encode_text(texts, center=centre), so that they share one space."""
  spec = config.embed.text_tower
  if spec == "minilm":
    from dprdm_jax.encoders import text as text_lib  # pylint: disable=g-import-not-at-top
    text = text_lib.TextEncoder.load()
    return text, text.fit_center(list(offline.caption_vocabulary()))
  if spec.startswith("clip:"):
    return load_clip(spec[len("clip:"):]), None
  raise errors.InputError(f"embed.text_tower must be 'minilm' or 'clip:PATH', got {spec!r}")


def open_towers(config: ml_collections.ConfigDict):
  """(image encoder, caption encoder function) named by config.embed."""
  text, center = open_text_tower(config)
  return open_image_tower(config), lambda c: text.encode_text(c, center=center)


def _chunk_path(out: pathlib.Path, i: int) -> pathlib.Path:
  return out / "chunks" / f"chunk-{i:05d}.npz"


def _write_chunk(path: pathlib.Path, **arrays) -> None:
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


class _Progress:
  """Records done out of a total, on one rewritten line on a terminal, every 10% otherwise."""

  def __init__(self, total: int, done: int, label: str):
    self.total, self.done, self.label = total, done, label
    self.start = time.perf_counter()
    self._tty = sys.stderr.isatty()
    self._last_decile = -1

  def advance(self, n: int, fresh: int, elapsed: float) -> None:
    self.done += n
    rate = fresh / max(elapsed, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    line = (f"{self.label}: {self.done:,}/{self.total:,} records  {rate:,.0f} records/s  "
            f"ETA {eta:,.0f} s")
    decile = 10 * self.done // max(self.total, 1)
    if self._tty:
      print("\r" + line, end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
    elif decile != self._last_decile:
      print(line, file=sys.stderr, flush=True)
    self._last_decile = decile


def embed(config: ml_collections.ConfigDict, dataset: str, split: str, out) -> dict:
  """Embeds one split into OUT/images and OUT/captions; returns counts and throughput.

  Resumable: chunks already in OUT/chunks are kept. Refuses an OUT that holds finished stores.
  In a multi-process run (jax.distributed initialised) every process embeds its chunks, all
  meet at a barrier, process 0 writes the stores, and all meet again: every process returns
  once the stores exist, and a process that died makes the others fail at the barrier.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  out = pathlib.Path(out)
  if any((out / kind / "manifest.json").exists() for kind in KINDS):
    raise errors.InputError(f"{out} already holds embedding stores; choose another --out")
  source = open_source(config, dataset, split)
  image_encoder, encode_captions = open_towers(config)
  errors.make_directory(out / "chunks")
  chunks = list(pipeline.ordered_chunks(len(source), config.embed.chunk_size, process_index,
                                        process_count))
  todo = [(i, p) for i, p in chunks if not _chunk_path(out, i).exists()]
  progress = _Progress(sum(len(p) for _, p in chunks),
                       sum(len(p) for _, p in chunks) - sum(len(p) for _, p in todo),
                       f"embedding {source.name}")
  image_seconds = caption_seconds = 0.0
  fresh = distinct_captions = 0
  for i, positions in todo:
    records = source.read(positions)
    t0 = time.perf_counter()
    image_embeddings = image_encoder.encode_images(records["image"])
    t1 = time.perf_counter()
    # Template captions repeat (the offline sets have one per class): each distinct one is
    # encoded once.
    distinct, inverse = np.unique(np.asarray(records["caption"], dtype=str), return_inverse=True)
    caption_embeddings = encode_captions(distinct.tolist())[inverse]
    t2 = time.perf_counter()
    image_seconds += t1 - t0
    caption_seconds += t2 - t1
    fresh += len(positions)
    distinct_captions += len(distinct)
    _write_chunk(_chunk_path(out, i), ids=records["id"], images=image_embeddings,
                 captions=caption_embeddings, text=np.asarray(records["caption"], dtype=str))
    progress.advance(len(positions), fresh, image_seconds + caption_seconds)
  result = dict(dataset=source.name, records=len(source), embedded_now=fresh,
                image_dim=image_encoder.dim, images_per_second=fresh / max(image_seconds, 1e-9),
                distinct_captions=distinct_captions,
                captions_per_second=distinct_captions / max(caption_seconds, 1e-9),
                devices=jax.local_device_count())
  num_chunks = len(range(0, len(source), config.embed.chunk_size))
  _barrier(f"embed {out}: chunks written", process_count)
  if process_index == 0:
    result.update(_assemble(out, num_chunks))
  _barrier(f"embed {out}: stores written", process_count)
  if process_index != 0:
    result["stores"] = json.loads((out / "embed.json").read_text())
  return result


def _barrier(name: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _assemble(out: pathlib.Path, num_chunks: int) -> dict:
  """Writes the two stores from every chunk (all on disk: OUT is shared), deletes the chunks."""
  missing = [i for i in range(num_chunks) if not _chunk_path(out, i).exists()]
  if missing:
    raise errors.InputError(f"{len(missing)} chunks (e.g. {missing[0]}) are missing from "
                            f"{out / 'chunks'} after every process finished: is --out on storage "
                            "all processes share?")
  parts = [np.load(_chunk_path(out, i)) for i in range(num_chunks)]
  ids = np.concatenate([p["ids"] for p in parts])
  text = np.concatenate([p["text"] for p in parts]).tolist()
  stores = {}
  for kind in KINDS:
    store = store_lib.EmbeddingStore.write(out / kind, np.concatenate([p[kind] for p in parts]),
                                           ids=ids, payload=text)
    stores[kind] = dict(path=str(store.directory), fingerprint=store.fingerprint,
                        dim=store.dim, records=len(store))
  for i in range(num_chunks):
    _chunk_path(out, i).unlink()
  (out / "chunks").rmdir()
  (out / "embed.json").write_text(json.dumps(stores, indent=1))
  return dict(stores=stores)
