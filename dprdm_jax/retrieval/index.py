"""ScaNN indexes over unit-norm embeddings: exact brute force, or a tree with asymmetric hashing.

An index maps query embeddings to the record ids of their k largest inner products. Two modes:

- "exact": ScaNN's float32 brute force. Every record is scored, so the result is the true top k,
  ties going to the lower position (the lower id when ids ascend, as in an embedding store).
- "fast": a k-means tree (about sqrt(N) leaves, a tenth of them searched per query), asymmetric
  hashing (AH) with 2 dimensions per block to score the candidates of those leaves, and exact
  float32 rescoring of the best few hundred. Approximate: a true neighbour can be missed.

Private retrieval may only use the exact mode; see `ScannIndex.is_exact` for why. The fast mode is
for public retrieval sets and non-private baselines.

Default parameters follow the CompVis RDM authors' searcher (scripts/train_searcher.py): brute force
below 20,000 rows, above it a tree of int(sqrt(N)) leaves trained on a sample of the data, AH with
2 dims per block and anisotropic threshold 0.2, then reordering. Three changes, measured by
recall@10 against exact search on 100,000 unit vectors in 1,000 Gaussian clusters (d = 128, the
fast-mode test): the tree is trained on at least 100,000 rows (ScaNN's own default) rather than
N/10, which leaves ~30 rows per leaf, and is spherical, since generic k-means centres of unit
vectors mis-rank leaves under inner product (together 0.56 -> 0.98, a twentieth of the leaves
searched); a tenth of the leaves is searched rather than a twentieth (0.98 -> 0.99, search time
x1.5); and 250 candidates are rescored rather than 2k.

On disk an index is a directory: ScaNN's own assets, written with paths relative to the directory
so that it can be moved or copied, plus

  index.json    format version, N, d, the resolved parameters
  ids.npy       (N,) int64 record ids in ScaNN's row order
"""

import json
import math
import os
import shutil
import tempfile
import time
from typing import Mapping, Optional, Union

from absl import logging
import ml_collections
import ml_dtypes
import numpy as np
import scann

from dprdm_jax import errors

FORMAT_VERSION = 1
MODES = ("auto", "exact", "fast")
# "auto" builds an exact index below this many rows, a fast one from it on.
EXACT_MAX_ROWS = 20_000
PAD_ID = -1
# The anisotropic quantisation threshold of AH, as in the authors' searcher and ScaNN's examples.
AH_THRESHOLD = 0.2
# The least number of rows the tree is trained on (all of them when N is smaller).
MIN_TRAINING_SAMPLE = 100_000
_INT_PARAMS = ("num_leaves", "num_leaves_to_search", "training_sample_size", "dims_per_block",
               "reorder_k")
_PARAMS = ("mode", "spherical") + _INT_PARAMS
_MANIFEST = "index.json"
_IDS = "ids.npy"
# ScaNN wants a default k at build time; every search passes its own.
_BUILD_K = 10

Config = Union[ml_collections.ConfigDict, Mapping]
# Rows may be off unit norm by this much: bfloat16 rounding (an embedding store's compact dtype)
# moves a norm by up to 0.4%; a table that was never normalised is far off.
_NORM_TOLERANCE = 1e-2


def _is_float(dtype: np.dtype) -> bool:
  """Whether `dtype` is a numpy float or bfloat16, both used as float32."""
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise errors.InputError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def index_config(num_rows: int) -> ml_collections.ConfigDict:
  """The default index parameters for N = num_rows records (mode "auto"; see the module doc)."""
  num_rows = _check_positive_int("num_rows", num_rows)
  num_leaves = max(1, math.isqrt(num_rows))
  return ml_collections.ConfigDict(dict(
      mode="auto",  # "exact" (brute force), "fast" (tree + AH + reorder) or "auto" (by N)
      num_leaves=num_leaves,  # tree leaves (k-means centres), about sqrt(N)
      num_leaves_to_search=max(1, num_leaves // 10),  # leaves scored per query
      training_sample_size=min(num_rows, max(MIN_TRAINING_SAMPLE, num_rows // 10)),  # tree k-means
      spherical=True,  # spherical k-means: unit-norm centres, right for inner products
      dims_per_block=2,  # AH: dimensions per 16-centre codebook
      reorder_k=250,  # candidates rescored exactly in float32 (at least k)
  ))


def resolve_mode(mode: str, num_rows: int) -> str:
  """The mode to build: `mode`, or for "auto" "exact" below EXACT_MAX_ROWS rows, else "fast"."""
  if mode not in MODES:
    raise errors.InputError(f"index mode must be one of {MODES}, got {mode!r}")
  if mode == "auto":
    return "exact" if num_rows < EXACT_MAX_ROWS else "fast"
  return mode


def _check_config(config: Config, num_rows: int, dim: int) -> dict:
  """The parameters of `config` with the mode resolved, checked against an (N, d) table."""
  params = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  if set(params) != set(_PARAMS):
    raise errors.InputError(f"an index config has exactly the fields {sorted(_PARAMS)}; "
                            f"missing {sorted(set(_PARAMS) - set(params))}, "
                            f"unknown {sorted(set(params) - set(_PARAMS))}")
  params["mode"] = resolve_mode(params["mode"], num_rows)
  for name in _INT_PARAMS:
    params[name] = _check_positive_int(name, params[name])
  if not isinstance(params["spherical"], bool):
    raise errors.InputError(f"spherical must be a bool, got {params['spherical']!r}")
  if params["num_leaves_to_search"] > params["num_leaves"]:
    raise errors.InputError(f"num_leaves_to_search ({params['num_leaves_to_search']}) exceeds "
                            f"num_leaves ({params['num_leaves']})")
  if params["mode"] == "fast":
    trained_on = min(num_rows, params["training_sample_size"])
    if params["num_leaves"] > trained_on:
      raise errors.InputError(f"num_leaves ({params['num_leaves']}) exceeds the {trained_on} rows "
                              "the tree is trained on (min of N and training_sample_size)")
    if params["dims_per_block"] > dim:
      raise errors.InputError(f"dims_per_block ({params['dims_per_block']}) exceeds d ({dim})")
  return params


def _float32_rows(name: str, x, shape_ok: bool, want: str) -> np.ndarray:
  """x as a contiguous float32 matrix; ValueError unless shape_ok, floating point and finite."""
  if not shape_ok:
    raise errors.InputError(f"{name} must have shape {want}, got {np.shape(x)}")
  if not _is_float(x.dtype):
    raise errors.InputError(f"{name} must be floating point, got {x.dtype}")
  x = np.ascontiguousarray(x, np.float32)
  if not np.isfinite(x).all():
    raise errors.InputError(f"{name} hold non-finite values")
  return x


def _check_table(embeddings, ids) -> tuple[np.ndarray, np.ndarray]:
  """The embeddings as float32 (N, d) unit rows and the ids as unique int64 >= 0 (N,)."""
  embeddings, ids = np.asarray(embeddings), np.asarray(ids)
  embeddings = _float32_rows("embeddings", embeddings,
                             embeddings.ndim == 2 and 0 not in embeddings.shape,
                             "(N, d): a non-empty (N, d) matrix")
  norms = np.linalg.norm(embeddings, axis=1)
  worst = int(np.argmax(np.abs(norms - 1)))
  if abs(norms[worst] - 1) > _NORM_TOLERANCE:
    raise errors.InputError(f"embeddings must be unit-norm rows; row {worst} has norm "
                            f"{norms[worst]:.6g}")
  if ids.shape != (len(embeddings),):
    raise errors.InputError(f"ids must have shape ({len(embeddings)},), one per row, got "
                            f"{ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise errors.InputError(f"ids must be integers, got {ids.dtype}")
  ids = ids.astype(np.int64)  # a uint64 id of 2**63 or more wraps negative and is refused below
  if (ids < 0).any():
    raise errors.InputError(f"ids must be >= 0 ({PAD_ID} marks padding) and below 2**63")
  unique, counts = np.unique(ids, return_counts=True)
  if len(unique) != len(ids):
    raise errors.InputError(f"ids must be unique; {unique[counts > 1][:5].tolist()} repeat")
  return embeddings, ids


class ScannIndex:
  """A ScaNN searcher over records with ids. Make one with `build` or `load`."""

  def __init__(self, searcher, ids: np.ndarray, params: dict, dim: int):
    """Wraps a built searcher; `ids[i]` is the record id of ScaNN row i. Use `build` or `load`."""
    self._searcher = searcher
    self._ids = ids
    self._ids.flags.writeable = False
    self._params = params
    self._dim = dim

  @classmethod
  def build(cls, embeddings: np.ndarray, ids: np.ndarray,
            config: Optional[Config] = None) -> "ScannIndex":
    """Builds an index over (N, d) unit-norm embeddings whose row i is record ids[i].

    Args:
      embeddings: (N, d) floating point or bfloat16, rows of unit L2 norm (to 1%); used as float32.
      ids: (N,) unique integer record ids in [0, 2**63).
      config: index parameters, `index_config(N)` when None; mode "auto" resolves by N.

    Raises:
      ValueError: for a malformed table or config.
    """
    embeddings, ids = _check_table(embeddings, ids)
    num_rows, dim = embeddings.shape
    params = _check_config(index_config(num_rows) if config is None else config, num_rows, dim)
    logging.info("Building a %s ScaNN index over %d x %d embeddings with %s", params["mode"],
                 num_rows, dim, params)
    start = time.monotonic()
    builder = scann.scann_ops_pybind.builder(embeddings, _BUILD_K, "dot_product")
    if params["mode"] == "exact":
      builder = builder.score_brute_force()
    else:
      builder = builder.tree(
          params["num_leaves"], params["num_leaves_to_search"], params["training_sample_size"],
          spherical=params["spherical"]).score_ah(
              params["dims_per_block"], anisotropic_quantization_threshold=AH_THRESHOLD).reorder(
                  params["reorder_k"])
    searcher = builder.build()
    logging.info("Built the %s ScaNN index over %d x %d embeddings in %.1f s", params["mode"],
                 num_rows, dim, time.monotonic() - start)
    return cls(searcher, ids, params, dim)

  @property
  def mode(self) -> str:
    """The resolved mode, "exact" or "fast"."""
    return self._params["mode"]

  @property
  def is_exact(self) -> bool:
    """True only for brute force: the only mode private retrieval may use.

    Private retrieval (rule R1: a query's results must depend only on the records of its Poisson
    subsample) may only use exact search, for two reasons. With an approximate index, which
    sampled records are found depends on the non-sampled ones: they shape the tree's leaves and
    the quantisation codebooks, and they compete for the leaves searched and the candidates
    rescored, so they can displace sampled records from the result. And an index trained on
    private data (k-means centres, AH codebooks) is itself a release of that data, outside the
    privacy accounting. The fast mode is for public retrieval sets and non-private baselines.
    """
    return self.mode == "exact"

  @property
  def num_rows(self) -> int:
    """N, the number of records."""
    return len(self._ids)

  @property
  def dim(self) -> int:
    """d, the embedding dimension."""
    return self._dim

  @property
  def ids(self) -> np.ndarray:
    """(N,) int64 record ids in row order, read-only."""
    return self._ids

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The parameters the index was built with, mode resolved (a copy)."""
    return ml_collections.ConfigDict(self._params)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k records of largest inner product with each query, best first.

    Args:
      queries: (B, d) finite floating point or bfloat16, used as float32.
      k: neighbours per query, >= 1.

    Returns:
      ids: (B, k) int64 record ids, PAD_ID (-1) where fewer than k records were found (k > N, or
        in fast mode fewer than k candidates in the searched leaves).
      scores: (B, k) float32 inner products, non-increasing along each row, -inf at padding.

    Raises:
      ValueError: for malformed queries or k.
    """
    k = _check_positive_int("k", k)
    queries = np.asarray(queries)
    queries = _float32_rows("queries", queries,
                            queries.ndim == 2 and queries.shape[1] == self._dim,
                            f"(B, {self._dim})")
    if not len(queries):
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    # Fast mode rescores max(k, reorder_k) candidates, so a k above reorder_k is not cut short.
    # One batch of queries per core: ScaNN searches the batches in parallel threads (1.7x on 2
    # cores for 256 exact queries at N = 10**5; search_batched uses one core).
    per_core = -(-len(queries) // (os.cpu_count() or 1))
    positions, scores = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=max(k, self._params["reorder_k"]),
        batch_size=per_core)
    found = ~np.isnan(scores)  # ScaNN pads a short result with NaN scores
    ids = np.where(found, self._ids[np.where(found, positions, 0)], PAD_ID)
    return ids, np.where(found, scores, -np.inf).astype(np.float32)

  def save(self, directory: Union[str, os.PathLike]) -> None:
    """Writes the index to `directory`, which must not exist or be empty.

    The index is written to a temporary sibling and renamed into place, so `directory` holds
    either nothing or a whole index. It can be moved or copied afterwards.

    Raises:
      FileExistsError: if `directory` holds anything.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
      raise FileExistsError(f"{directory} exists and is not an empty directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
      self._searcher.serialize(staging, relative_path=True)
      np.save(os.path.join(staging, _IDS), self._ids)
      manifest = dict(format_version=FORMAT_VERSION, num_rows=self.num_rows, dim=self._dim,
                      config=self._params)
      with open(os.path.join(staging, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
      os.replace(staging, directory)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    logging.info("Saved the %s ScaNN index over %d records to %s", self.mode, self.num_rows,
                 directory)

  @classmethod
  def load(cls, directory: Union[str, os.PathLike]) -> "ScannIndex":
    """Reads an index written by `save`, from wherever it has been moved or copied to.

    Raises:
      ValueError: if `directory` is not such an index, or its files disagree with its manifest.
    """
    directory = os.fspath(directory)
    manifest_path = os.path.join(directory, _MANIFEST)
    if not os.path.isfile(manifest_path):
      raise errors.InputError(f"{directory} is not an index saved by ScannIndex.save: no "
                              f"{_MANIFEST}")
    try:
      with open(manifest_path) as f:
        manifest = json.load(f)
      version, num_rows, dim = manifest["format_version"], manifest["num_rows"], manifest["dim"]
      config = manifest["config"]
    except (ValueError, KeyError, TypeError) as e:
      raise errors.InputError(f"{manifest_path} is not an index manifest: {e!r}") from e
    if version != FORMAT_VERSION:
      raise errors.InputError(f"{directory} holds index format {version!r}; this code reads "
                              f"{FORMAT_VERSION}")
    num_rows, dim = _check_positive_int("num_rows", num_rows), _check_positive_int("dim", dim)
    params = _check_config(config, num_rows, dim)
    if params["mode"] != config["mode"]:
      raise errors.InputError(f"{manifest_path} has an unresolved mode {config['mode']!r}")
    ids = np.load(os.path.join(directory, _IDS), allow_pickle=False)
    if ids.dtype != np.int64 or ids.shape != (num_rows,):
      raise errors.InputError(f"{directory}/{_IDS} holds {ids.dtype} {ids.shape}, expected int64 "
                              f"({num_rows},)")
    searcher = scann.scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
    if searcher.size() != num_rows:
      raise errors.InputError(f"the ScaNN searcher in {directory} holds {searcher.size()} rows, "
                              f"its manifest {num_rows}")
    logging.info("Loaded the %s ScaNN index over %d x %d embeddings from %s", params["mode"],
                 num_rows, dim, directory)
    return cls(searcher, ids, params, dim)
