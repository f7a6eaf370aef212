"""The embedding store: unit-norm embeddings of a dataset's records, on disk, memory-mapped.

A store is a directory:

  manifest.json            format version, N, d, dtype, shard sizes, fingerprint
  ids-00000.npy            (n_0,) int64 record ids of shard 0, ascending across all shards
  embeddings-00000.npy     (n_0, d) float32, or bfloat16 kept as its uint16 bit pattern
  payload-00000.json       optional: one string per record (a caption, a file name)

Record ids are integers in [0, 2**32), unique, and stored in ascending order, so that a record's
position and its id order agree: both retrieval back-ends break score ties by the lower id.
Rows are L2-normalised when written; a zero row, a non-finite value or a row of the wrong width is
refused. Ids are 32-bit because the Poisson subsample (`subsample`) hashes them with a keyed
pseudorandom function.

The fingerprint is a SHA-256 over the format, the dtype, d, all ids and all embedding bytes in id
order (the shard layout does not enter it). The budget ledger keys a dataset's privacy budget by
it, so any changed row gives a new fingerprint. That cuts both ways: a store rebuilt from the same
private records after an edit is a new dataset to the ledger, and the curator must carry its spent
budget over (a new fingerprint does not make the old records less exposed).
"""

import hashlib
import json
import os
import pathlib
from typing import Iterable, Optional, Sequence

import ml_dtypes
import numpy as np

from dprdm_jax import errors

FORMAT_VERSION = 1
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_MAX_ID = 2**32


class StoreError(errors.InputError):
  """A store directory or the data written to it is not valid."""


def _shard_name(kind: str, index: int, suffix: str) -> str:
  return f"{kind}-{index:05d}.{suffix}"


def normalise_rows(embeddings: np.ndarray) -> np.ndarray:
  """Float32 rows scaled to unit L2 norm; StoreError for zero, non-finite, non-real or non-2-D
  input."""
  kind = np.asarray(embeddings).dtype.kind
  if kind not in "fiu" and np.asarray(embeddings).dtype.name != "bfloat16":
    raise StoreError(f"embeddings must be real numbers, got dtype {np.asarray(embeddings).dtype}")
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2 or x.shape[1] == 0:
    raise StoreError(f"embeddings must be a 2-D (N, d) array with d >= 1, got shape {x.shape}")
  finite = np.isfinite(x).all(axis=1)
  if not finite.all():
    raise StoreError(f"{int((~finite).sum())} rows hold non-finite values, e.g. row "
                     f"{int(np.flatnonzero(~finite)[0])}")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if (norms == 0).any():
    raise StoreError(f"{int((norms == 0).sum())} rows are zero vectors, e.g. row "
                     f"{int(np.flatnonzero(norms[:, 0] == 0)[0])}; a zero row has no direction")
  return x / norms


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
    raise StoreError(f"ids must be {n} integers, got {ids.dtype} of shape {ids.shape}")
  ids = ids.astype(np.int64)
  if n and (ids.min() < 0 or ids.max() >= _MAX_ID):
    raise StoreError(f"record ids must lie in [0, 2**32), got [{ids.min()}, {ids.max()}]")
  if len(np.unique(ids)) != n:
    raise StoreError("record ids must be unique")
  return ids


def _fingerprint(dtype: str, dim: int, shards) -> str:
  """SHA-256 of the header, then all ids, then all rows: independent of the shard layout."""
  h = hashlib.sha256(f"dprdm-store v{FORMAT_VERSION} {dtype} d={dim}\n".encode())
  for ids, _ in shards:
    h.update(np.ascontiguousarray(ids, "<i8").tobytes())
  for _, embeddings in shards:  # in slices: a memory-mapped shard is never copied whole
    for start in range(0, len(embeddings), 1 << 16):
      h.update(np.ascontiguousarray(embeddings[start:start + (1 << 16)]).tobytes())
  return h.hexdigest()


class EmbeddingStore:
  """A read-only, memory-mapped embedding store (see the module docstring for the layout)."""

  def __init__(self, directory, verify: bool = True):
    """Opens the store in `directory`; with `verify`, recomputes the fingerprint (reads it all)."""
    self.directory = pathlib.Path(directory)
    manifest_path = self.directory / "manifest.json"
    try:
      manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
      raise StoreError(f"{self.directory} is not an embedding store: {e}") from None
    if (manifest.get("format") != "dprdm-embedding-store"
        or manifest.get("version") != FORMAT_VERSION):
      raise StoreError(f"{manifest_path} is not a version-{FORMAT_VERSION} dprdm embedding store")
    self.dim = manifest["dim"]
    self.dtype = manifest["dtype"]
    self.fingerprint = manifest["fingerprint"]
    self._shard_rows = manifest["shard_rows"]
    self._has_payload = manifest["payload"]
    self._shards = []
    for i, rows in enumerate(self._shard_rows):
      try:
        ids = np.load(self.directory / _shard_name("ids", i, "npy"), mmap_mode="r")
        raw = np.load(self.directory / _shard_name("embeddings", i, "npy"), mmap_mode="r")
      except (OSError, ValueError) as e:
        raise StoreError(f"shard {i} of {self.directory} is unreadable: {e}") from None
      if ids.shape != (rows,) or raw.shape != (rows, self.dim):
        raise StoreError(f"shard {i} of {self.directory} has shapes {ids.shape} and {raw.shape}, "
                         f"the manifest says ({rows},) and ({rows}, {self.dim})")
      self._shards.append((ids, raw.view(_DTYPES[self.dtype])))
    if verify and _fingerprint(self.dtype, self.dim, self._shards) != self.fingerprint:
      raise StoreError(f"{self.directory}: the data does not match the manifest's fingerprint")

  @classmethod
  def write(cls, directory, embeddings: np.ndarray, ids: Optional[np.ndarray] = None,
            payload: Optional[Sequence[str]] = None, dtype: str = "float32",
            shard_rows: int = 1 << 20) -> "EmbeddingStore":
    """Writes a store of the L2-normalised rows of `embeddings` (N, d) and opens it.

    ids default to 0..N-1; rows are reordered so that ids ascend. The directory must not hold a
    store already. Raises StoreError on invalid input.
    """
    x = normalise_rows(embeddings)
    n = len(x)
    ids = _check_ids(np.arange(n) if ids is None else ids, n)
    if payload is not None and len(payload) != n:
      raise StoreError(f"payload has {len(payload)} entries for {n} rows")
    if shard_rows < 1:
      raise StoreError(f"shard_rows must be >= 1, got {shard_rows}")
    order = np.argsort(ids, kind="stable")
    ids, x = ids[order], x[order]
    starts = range(0, max(n, 1), shard_rows)
    texts = None if payload is None else [
        [str(payload[j]) for j in order[s:s + shard_rows]] for s in starts]
    return cls._write(directory, ((ids[s:s + shard_rows], x[s:s + shard_rows]) for s in starts),
                      x.shape[1], dtype, texts)

  @classmethod
  def write_shards(cls, directory, shards: Iterable[tuple[np.ndarray, np.ndarray]], dim: int,
                   dtype: str = "float32",
                   payload: Optional[Sequence[Sequence[str]]] = None) -> "EmbeddingStore":
    """Writes a store shard by shard from (ids, rows) pairs and opens it: a table larger than
    memory is written with one shard in memory at a time.

    Each shard's rows are L2-normalised; its ids must ascend and follow the previous shard's.
    payload: one list of strings per shard, or None. The fingerprint is computed at the end by
    reading the shards back. Raises StoreError on invalid input; a directory without the final
    manifest is not a store.
    """
    return cls._write(directory, ((shard_ids, normalise_rows(rows) if len(rows) else rows)
                                  for shard_ids, rows in shards), dim, dtype, payload)

  @classmethod
  def _write(cls, directory, shards, dim: int, dtype: str, payload) -> "EmbeddingStore":
    """`write_shards` of rows already normalised (normalising twice changes the last bits)."""
    if dtype not in _DTYPES:
      raise StoreError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    directory = pathlib.Path(directory)
    if (directory / "manifest.json").exists():
      raise StoreError(f"{directory} already holds a store")
    errors.make_directory(directory)
    sizes, last = [], -1
    for i, (shard_ids, rows) in enumerate(shards):
      rows = np.asarray(rows, np.float32)
      if rows.ndim != 2 or rows.shape[1] != dim:
        raise StoreError(f"shard {i} has rows of shape {rows.shape}, not (n, {dim})")
      shard_ids = _check_ids(shard_ids, len(rows))
      if len(shard_ids) and (shard_ids[0] <= last or (np.diff(shard_ids) <= 0).any()):
        raise StoreError(f"the ids of shard {i} do not ascend from the previous shard's")
      last = shard_ids[-1] if len(shard_ids) else last
      rows = rows.astype(_DTYPES[dtype])
      np.save(directory / _shard_name("ids", i, "npy"), shard_ids)
      np.save(directory / _shard_name("embeddings", i, "npy"),
              rows.view(np.uint16) if dtype == "bfloat16" else rows)
      if payload is not None:
        if len(payload[i]) != len(rows):
          raise StoreError(f"payload of shard {i} has {len(payload[i])} entries for {len(rows)}")
        (directory / _shard_name("payload", i, "json")).write_text(json.dumps(list(payload[i])))
      sizes.append(len(rows))
    written = [(np.load(directory / _shard_name("ids", i, "npy"), mmap_mode="r"),
                np.load(directory / _shard_name("embeddings", i, "npy"), mmap_mode="r"))
               for i in range(len(sizes))]
    manifest = {"format": "dprdm-embedding-store", "version": FORMAT_VERSION,
                "num_rows": sum(sizes), "dim": dim, "dtype": dtype, "shard_rows": sizes,
                "payload": payload is not None,
                "fingerprint": _fingerprint(dtype, dim, written)}
    del written
    # The manifest is written last, atomically: a directory without one is not a store.
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, directory / "manifest.json")
    return cls(directory, verify=False)

  def __len__(self) -> int:
    return sum(self._shard_rows)

  @property
  def ids(self) -> np.ndarray:
    """(N,) int64 record ids, ascending."""
    return np.concatenate([ids for ids, _ in self._shards])

  @property
  def embeddings(self) -> np.ndarray:
    """(N, d) rows (float32, or ml_dtypes.bfloat16); the memory map itself for a one-shard store,
    a copy in memory otherwise."""
    if len(self._shards) == 1:
      return self._shards[0][1]
    return np.concatenate([x for _, x in self._shards])

  @property
  def shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (ids, rows) of each shard, in id order: memory maps, nothing copied."""
    return list(self._shards)

  def take(self, positions: np.ndarray) -> np.ndarray:
    """(len(positions), d) float32 rows at table positions (shards numbered in order), read from
    the shards in place: a multi-shard store is never concatenated. StoreError for a position
    outside the table."""
    positions = np.asarray(positions, np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
      raise StoreError(f"positions must be in [0, {len(self)}), got "
                       f"{positions.min()}..{positions.max()}")
    if len(self._shards) == 1 and self._shards[0][1].dtype == np.float32:
      # Into a new array: np.take with out= and mode "raise" copies through a buffer (4x slower).
      return np.take(np.asarray(self._shards[0][1]), positions, axis=0)
    out = np.empty((len(positions), self.dim), np.float32)
    start = 0
    for ids, rows in self._shards:
      rows = np.asarray(rows)  # the mapped array without np.memmap's per-item overhead
      inside = (positions >= start) & (positions < start + len(ids))
      out[inside] = rows[positions[inside] - start]
      start += len(ids)
    return out

  @property
  def payload(self) -> Optional[list[str]]:
    """The per-record strings, in id order, or None."""
    if not self._has_payload:
      return None
    return [t for i in range(len(self._shards))
            for t in json.loads((self.directory / _shard_name("payload", i, "json")).read_text())]
