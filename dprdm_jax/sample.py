"""`dprdm sample`: what a trained U-Net draws when conditioned on public test neighbours.

A check of the generator alone, before any private data is involved: for one public test image
per class (up to --rows), the image tower embeds it; its k nearest rows in the public training
image store that `dprdm train` conditioned on (found with the ScaNN index as the training
neighbours were: exact below retrieval.index.EXACT_MAX_ROWS rows) are averaged into one context
token, as in training; and the U-Net's EMA parameters draw --per-row samples from that context by
DDIM with classifier-free guidance (config.diffusion: sample_steps, eta, guidance_scale, clip_x0).

The grid has one row per test image: the test image, its k public neighbours, a gap, then the
samples. The test image itself is never in the context (the public test split is not in the
training store), so a row shows whether the model turns a neighbourhood of public embeddings into
images of that neighbourhood. Nothing here reads private data or spends privacy budget.
"""

import pathlib
from typing import Optional

import jax
import ml_collections
import numpy as np

from dprdm_jax import checkpoints
from dprdm_jax import embed
from dprdm_jax import errors
from dprdm_jax import release
from dprdm_jax import sharding
from dprdm_jax import train
from dprdm_jax.data import source as source_lib
from dprdm_jax.diffusion import sampler
from dprdm_jax.retrieval import index as index_lib
from dprdm_jax.retrieval import store as store_lib


def pick_rows(source: source_lib.Source, rows: int) -> np.ndarray:
  """Positions of the first record of each class in label order, then of each class again.

  Deterministic: the same split gives the same rows. A source without labels gives its first rows.
  """
  labels = source.read(np.arange(len(source)))["label"]
  if (labels < 0).all():
    return np.arange(min(rows, len(source)))
  order = np.argsort(labels, kind="stable")
  rank = np.empty(len(labels), np.int64)  # a record's rank among the records of its class
  starts = np.searchsorted(labels[order], labels[order])
  rank[order] = np.arange(len(labels)) - starts
  by_round = np.lexsort((labels, rank))  # first of every class, then the second of every class
  return by_round[:rows]


def positions_of(source: source_lib.Source, ids: np.ndarray) -> np.ndarray:
  """The positions in `source` of records by id; ValueError if one is not there."""
  order = np.argsort(source.ids, kind="stable")
  sorted_ids = source.ids[order]
  found = np.minimum(np.searchsorted(sorted_ids, ids), len(order) - 1)
  if not np.array_equal(sorted_ids[found], ids):
    raise errors.InputError(f"{source.name} does not hold every id of the store; the store must "
                            "embed the same split")
  return order[found]


def load_ema(config: ml_collections.ConfigDict, workdir,
             mesh: jax.sharding.Mesh) -> tuple[train.Trainer, dict, int]:
  """(trainer, EMA parameters, step) of the latest checkpoint of `dprdm train` in `workdir`, or
  of the release (`dprdm export`) in it."""
  trainer = train.Trainer(config, mesh)
  if release.is_release(workdir):
    return (trainer, *release.load_ema(trainer, workdir))
  restored = checkpoints.restore_latest(workdir, {"ema": trainer.abstract_state["ema"]})
  if restored is None:
    raise errors.MissingError(f"{workdir} holds no checkpoint of `dprdm train`; train first")
  step, state = restored
  return trainer, state["ema"], step


def draw(trainer: train.Trainer, params: dict, contexts: np.ndarray, seed: int) -> np.ndarray:
  """Samples (n, R, R, C) in [-1, 1] for contexts (n, L, d), one compiled DDIM program.

  The batch is padded to a multiple of the mesh's batch devices and split over them.
  """
  config, c = trainer.config.diffusion, trainer.model_config
  mesh = trainer.mesh
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  n = len(contexts)
  padded = np.zeros((-(-n // devices) * devices,) + contexts.shape[1:], np.float32)
  padded[:n] = contexts
  batch_sharding = sharding.batch_sharding(mesh)
  shape = (len(padded), c.resolution, c.resolution, c.out_channels)

  @jax.jit
  def run(params, key, context):
    model = trainer.model(params)
    return sampler.ddim_sample(
        lambda x, t, ctx: model(x, t, ctx, deterministic=True), trainer.schedule, key, shape,
        context, num_steps=config.sample_steps, eta=config.eta,
        guidance_scale=config.guidance_scale, clip_x0=config.clip_x0, sharding=batch_sharding)

  context = jax.device_put(padded, batch_sharding)
  return np.asarray(run(params, jax.random.key(seed), context))[:n]


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats (the training scale) -> uint8 pixels, clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(rows: list[list[Optional[np.ndarray]]], scale: int = 2, gap: int = 2) -> np.ndarray:
  """Tiles (R, R, C) uint8 images into one (H, W, C) picture; None leaves a blank tile."""
  tile = next(image for row in rows for image in row if image is not None)
  r, channels = tile.shape[0], tile.shape[2]
  cols = max(len(row) for row in rows)
  step = r * scale + gap
  out = np.full((len(rows) * step + gap, cols * step + gap, channels), 96, np.uint8)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      if image is not None:
        big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        top, left = gap + i * step, gap + j * step
        out[top:top + r * scale, left:left + r * scale] = big
  return out


def read_png(path) -> np.ndarray:
  """A PNG written by `write_png` as (H, W, C) uint8: C = 1 for grayscale, 3 for RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = np.asarray(Image.open(path))
  return picture[..., None] if picture.ndim == 2 else picture


def write_png(picture: np.ndarray, path) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  errors.make_directory(path.parent)
  mode = "L" if picture.shape[2] == 1 else "RGB"
  Image.fromarray(picture[..., 0] if mode == "L" else picture, mode).save(path)


# The largest grid `sample_grid` draws: one picture to look at, not a dataset (--rows 100000000
# drew every test image, 60,000 samples into one PNG, and held 11 GB after two minutes).
MAX_ROWS, MAX_PER_ROW = 200, 64


def sample_grid(config: ml_collections.ConfigDict, workdir, out, rows: int = 20,
                per_row: int = 6) -> dict:
  """Draws the grid described in the module docstring, writes it to `out` (PNG); a summary.

  k = config.train.num_neighbors, the number of neighbours the model was trained on.
  """
  k = config.train.num_neighbors
  if not (1 <= rows <= MAX_ROWS and 1 <= per_row <= MAX_PER_ROW):
    raise errors.InputError(f"rows must lie in [1, {MAX_ROWS}] and per_row in [1, {MAX_PER_ROW}], "
                            f"got {rows} and {per_row}")
  mesh = sharding.make_mesh(config.mesh)
  trainer, params, step = load_ema(config, workdir, mesh)

  test = embed.open_source(config, config.data.public, config.data.public_test_split)
  public = embed.open_source(config, config.data.public, "train")
  chosen = test.read(pick_rows(test, rows))
  encoder = embed.open_image_tower(config)
  queries = encoder.encode_images(chosen["image"])
  store = store_lib.EmbeddingStore(config.train.embeddings)
  keys = np.asarray(store.embeddings, np.float32)
  # Searched as the training neighbours were (retrieval/public.py): public data, no subsample.
  index = index_lib.ScannIndex.build(keys, store.ids, index_lib.index_config(len(store)))
  found = np.searchsorted(store.ids, index.search(queries, k)[0])
  contexts = keys[found].mean(axis=1, keepdims=True)  # (n, 1, d): the training context, noiseless
  samples = to_uint8(draw(trainer, params, np.repeat(contexts, per_row, axis=0), config.seed))

  neighbours = public.read(positions_of(public, store.ids[found].reshape(-1)))["image"]
  neighbours = neighbours.reshape(found.shape + neighbours.shape[1:])
  picture = grid([[chosen["image"][i], *neighbours[i], None,
                   *samples[i * per_row:(i + 1) * per_row]] for i in range(len(found))])
  write_png(picture, out)
  d = config.diffusion
  return dict(out=str(out), checkpoint_step=step, rows=len(found), per_row=per_row, k=k,
              captions=[str(c) for c in chosen["caption"]], sample_steps=d.sample_steps,
              eta=d.eta, guidance_scale=d.guidance_scale, clip_x0=d.clip_x0, seed=config.seed)
