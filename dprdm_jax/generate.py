"""`dprdm generate`: prompts -> images of the private domain, each private query charged first.

One prompt is one query and one image. Modes (`MODES`):

  private     DP-RDM: the exact top k of a fresh Poisson subsample of the private set (R1), their
              clipped mean plus Gaussian noise (R2), keys from a ledger grant (R3), charged to the
              private set's budget (R4, R5) before anything private is read.
  public      the k nearest public records (no subsample, no noise): free.
  nonprivate  the private set with q = 1 and no noise: epsilon = infinity, a comparison only; never
              charged, and refused unless the caller passes allow_nonprivate=True.
  none        the prompt alone (mapped into the value space by the towers' prompt map): free.

Each batch of prompts runs as ONE compiled program from query embeddings to images on the mesh:
retrieval (`retrieval.device`, the table sharded by rows over the mesh's data axis when it has
several devices), aggregation (`privacy.aggregate`), and DDIM with classifier-free guidance
(`diffusion.sampler`) from the U-Net's EMA parameters. With config.generate.retrieval = "host"
the table stays in the stores' files instead, for a retrieval set larger than device memory (or
a CPU, where the host's compiled scan is the faster search): the exact private retrieval runs on
the host (`retrieval.host.HostRetriever`, the same neighbours as the device path for the same
keys), and the aggregation and DDIM run as one compiled program. A run's batches hold
config.generate.batch_size prompts, or all of them when there are fewer, rounded up to the batch
devices; a batch shorter than that (the last one) is padded with copies of its first query, keys
included: a copy computes exactly its original's context, so it reveals nothing more, and it is
dropped before anything is written.

Privacy (the only public path to private retrieval in this module is `generate_private`, which
takes a `ledger.Grant`; `generate` reaches the unprotected "nonprivate" comparison only with
allow_nonprivate=True): sigma, q, k and every subsample and noise key come from the grant, on
either route; the grant's fingerprint must be the private set's; the grant is obtained (durably
charged) by `generate` before the private stores are opened beyond their manifests, so a batch
the budget cannot cover is refused (`ledger.BudgetExceededError`, naming spent and remaining
epsilon) with no private row read. A crash after a charge leaves it spent; a batch's images are
written only after the whole batch is computed, so a partial batch is never released.

Output in OUT: one PNG and one JSON record per prompt (NNNNN.png, NNNNN.json, NNNNN the prompt's
position), records.jsonl with every record, in prompt order, and grid.png (a row per distinct
prompt, its first 8 images). A rerun with the same OUT skips the
prompts that already have a record (a private one is charged again only for prompts that were
never written). One run writes to an OUT at a time (a lock on OUT/.lock): a second is refused
before it charges anything.
"""

import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import pathlib
import sys
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dprdm_jax import embed
from dprdm_jax import errors
from dprdm_jax import release
from dprdm_jax import sample
from dprdm_jax import sharding
from dprdm_jax.diffusion import sampler
from dprdm_jax.encoders import linear
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import aggregate
from dprdm_jax.privacy import keys as keys_lib
from dprdm_jax.privacy import ledger as ledger_lib
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import host
from dprdm_jax.retrieval import store as store_lib

MODES = ("private", "public", "nonprivate", "none")
ADJACENCY = "add-or-remove-one record"


# Where retrieval runs (config.generate.retrieval): the device program, or the host's scan.
RETRIEVAL = ("device", "host")
# Most images one run writes (into one directory, an image and a record each, all read back for
# records.jsonl and the grid): a typo such as --repeat 1000000000 is refused at once rather than
# expanded into a prompt list that exhausts the host's memory. Split larger runs.
MAX_IMAGES = 1_000_000
Table = Union[device.DeviceTable, host.HostRetriever]


class GenerateError(errors.InputError):
  """A prompt, a mode or a setting that `generate` refuses; nothing was charged."""


def check_prompts(prompts: Sequence, token_lengths, max_tokens: int) -> list[str]:
  """The prompts as a list of str, or GenerateError naming the first bad one.

  Refused: no prompts, more than MAX_IMAGES, a non-str (e.g. bytes that were not decoded), an
  empty or blank prompt, and a prompt of more than `max_tokens` tokens (the text tower would
  silently truncate it).
  token_lengths: fn(list of str) -> token counts, untruncated.
  """
  if isinstance(prompts, (str, bytes)):
    raise GenerateError("prompts must be a sequence of strings, not one string")
  prompts = list(prompts)
  if not prompts:
    raise GenerateError("no prompts given")
  check_count(len(prompts))
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise GenerateError(f"prompt {i} is a {type(p).__name__}, not text")
    if not p.strip():
      raise GenerateError(f"prompt {i} is empty")
  for i, n in enumerate(token_lengths(prompts)):
    if n > max_tokens:
      raise GenerateError(f"prompt {i} has {n} tokens; the text tower takes at most {max_tokens}")
  return prompts


def check_count(images: int) -> None:
  """GenerateError if one run is asked for more than MAX_IMAGES images."""
  if images > MAX_IMAGES:
    raise GenerateError(f"{images:,} images asked for; one run writes at most {MAX_IMAGES:,} "
                        "(split the prompts into several runs, each with its own --out)")


def read_prompts(path) -> list[str]:
  """One prompt per line of a UTF-8 text file (blank lines are refused, not skipped)."""
  try:
    text = pathlib.Path(path).read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise GenerateError(f"{path} is not UTF-8 text (byte {e.start})") from None
  except OSError as e:
    raise GenerateError(f"cannot read the prompts file: {e}") from None
  return text.splitlines()


def set_fingerprint(keys_fingerprint: str, values_fingerprint: str) -> str:
  """The ledger's name for a retrieval set: its value store's fingerprint when keys are values,
  else a SHA-256 of both (a changed key or value store is a new dataset to the ledger)."""
  if keys_fingerprint == values_fingerprint:
    return values_fingerprint
  return hashlib.sha256(f"dprdm-retrieval-set v1\nkeys {keys_fingerprint}\nvalues "
                        f"{values_fingerprint}\n".encode()).hexdigest()


@dataclasses.dataclass
class RetrievalSet:
  """The key and value stores of one retrieval set (same record ids), opened lazily.

  `fingerprint` and `size` read the manifests only; `table` reads and verifies every row.
  """
  keys_dir: str
  values_dir: str

  def __post_init__(self):
    self._keys = store_lib.EmbeddingStore(self.keys_dir, verify=False)
    self._values = store_lib.EmbeddingStore(self.values_dir, verify=False)
    if len(self._keys) != len(self._values):
      raise GenerateError(f"{self.keys_dir} holds {len(self._keys)} records, {self.values_dir} "
                          f"{len(self._values)}; keys and values must be the same records")
    self.fingerprint = set_fingerprint(self._keys.fingerprint, self._values.fingerprint)
    self.size = len(self._values)
    self.key_dim, self.value_dim = self._keys.dim, self._values.dim

  def table(self, mesh: Optional[jax.sharding.Mesh], where: str = "device") -> Table:
    """The searchable table, after recomputing both fingerprints (StoreError if a store's data
    no longer matches): where = "device", every row on device (sharded by rows over `data` when
    the mesh has several devices); "host", a HostRetriever that reads the stores' files in place
    (no mesh needed).
    """
    if where not in RETRIEVAL:
      raise GenerateError(f"config.generate.retrieval must be one of {', '.join(RETRIEVAL)}, got "
                          f"{where!r}")
    stores = [store_lib.EmbeddingStore(d) for d in (self.keys_dir, self.values_dir)]
    if not np.array_equal(stores[0].ids, stores[1].ids):
      raise GenerateError(f"{self.keys_dir} and {self.values_dir} hold different record ids")
    if where == "host":
      return host.HostRetriever(stores[0], values=stores[1])
    shards = mesh.shape["data"] > 1
    return device.DeviceTable.from_arrays(
        np.asarray(stores[0].embeddings, np.float32), stores[0].ids,
        mesh if shards else None, "data" if shards else None,
        values=np.asarray(stores[1].embeddings, np.float32))


class Generator:
  """The model, the towers and the compiled programs of one config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    g = config.generate
    checkpoint = g.checkpoint or config.train.workdir
    self.trainer, self.params, self.checkpoint_step = sample.load_ema(config, checkpoint,
                                                                      self.mesh)
    if release.is_release(checkpoint) and config.embed.image_tower == "linear":
      release.check_tower(checkpoint, pathlib.Path(config.encoder.workdir) / linear.FILE)
    self.text, center = embed.open_text_tower(config)
    self._encode_text = lambda p: self.text.encode_text(p, center=center)
    self.tower = embed.open_image_tower(config)
    context_dim = self.trainer.model_config.context_dim
    if self.tower.dim != context_dim:
      raise GenerateError(f"the image tower's embeddings have d = {self.tower.dim}, the U-Net "
                          f"reads d = {context_dim}: train the U-Net on this tower's store")
    self._devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = self.run_batch_size(g.batch_size)  # the largest batch a run uses
    self._programs = {}

  def run_batch_size(self, prompts: int) -> int:
    """Rows of each batch of a run of `prompts`: config.generate.batch_size or fewer, a multiple
    of the batch devices (one compiled program per run)."""
    rows = max(1, min(prompts, self.config.generate.batch_size))
    return -(-rows // self._devices) * self._devices

  def check_prompts(self, prompts) -> list[str]:
    return check_prompts(prompts, self.text.token_lengths, self.text.max_length)

  def embed_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text embeddings (B, 384) for caption keys, prompt values (B, d) in the image space)."""
    text = self._encode_text(prompts)
    values = self.tower.encode_prompts(text) if hasattr(self.tower, "encode_prompts") else text
    return text, values

  def queries(self, text: np.ndarray, values: np.ndarray) -> np.ndarray:
    """What retrieval scores against the keys: the text (caption keys) or the image-space prompt."""
    return text if self.config.embed.key == "caption" else values

  def _program(self, kind: str, rows: int, sampling_rate: Optional[float] = None,
               k: Optional[int] = None):
    """One jitted function per (kind, rows, q, k): retrieval + aggregation + DDIM ("retrieve"),
    aggregation + DDIM of neighbours retrieved on the host ("aggregate"), or DDIM alone ("none")."""
    name = (kind, rows, sampling_rate, k)
    if name in self._programs:
      return self._programs[name]
    d, mesh = self.config.diffusion, self.mesh
    c = self.trainer.model_config
    shape = (rows, c.resolution, c.resolution, c.out_channels)
    batch = sharding.batch_sharding(mesh)
    knn = None
    if kind == "retrieve":
      knn = (device.sharded_private_knn(mesh, "data", sampling_rate, k) if mesh.shape["data"] > 1
             else functools.partial(device.private_knn, sampling_rate=sampling_rate, k=k))

    def draw(params, context, sample_key, guidance_scale):
      model = self.trainer.model(params)
      context = jax.lax.with_sharding_constraint(context, batch)
      return sampler.ddim_sample(
          lambda x, t, ctx: model(x, t, ctx, deterministic=True), self.trainer.schedule,
          sample_key, shape, context, num_steps=d.sample_steps, eta=d.eta,
          guidance_scale=guidance_scale, clip_x0=d.clip_x0, sharding=batch)

    if kind == "retrieve":
      def run(params, table, queries, prompt_values, subsample_keys, noise_keys, noise_std,
              interpolation, sample_key, guidance_scale):
        found = knn(table, queries, subsample_keys)
        context = aggregate.aggregate(found.embeddings, found.valid, prompt_values, noise_keys,
                                      noise_std, interpolation)
        return draw(params, context, sample_key, guidance_scale)
    elif kind == "aggregate":
      def run(params, embeddings, valid, prompt_values, noise_keys, noise_std, interpolation,
              sample_key, guidance_scale):
        context = aggregate.aggregate(embeddings, valid, prompt_values, noise_keys, noise_std,
                                      interpolation)
        return draw(params, context, sample_key, guidance_scale)
    else:
      def run(params, prompt_values, sample_key, guidance_scale):
        return draw(params, prompt_values[:, None, :], sample_key, guidance_scale)
    program = jax.jit(run)
    self._programs[name] = program
    return program

  @staticmethod
  def _pad(rows: int, *arrays):
    """Each array padded to `rows` rows with copies of its first row (see the top)."""
    def pad(a):
      extra = rows - a.shape[0]
      return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)])
    return [pad(a) for a in arrays]

  def generate_private(self, grant: ledger_lib.Grant, retrieval_set: RetrievalSet,
                       table: Table, prompts: list[str], sample_key: jax.Array,
                       rows: Optional[int] = None, interpolation: Optional[float] = None,
                       guidance_scale: Optional[float] = None) -> np.ndarray:
    """DP-RDM images (B, R, R, C) uint8 for the grant's B queries (computed in a program of `rows`
    rows, default `run_batch_size(B)`). interpolation (lambda) and guidance_scale default to the
    generator's config; both act after the noise is added (post-processing).

    Guarantee: each image is post-processing of one Poisson-subsampled Gaussian mechanism with
    the grant's (sigma, q, k) (noise multiplier k*sigma/2, L2 sensitivity 2/k, rules R1-R3), whose
    keys are the grant's own; the grant was charged before this call (R5). Raises GenerateError if
    the grant is for another dataset or another number of prompts.
    """
    if grant.fingerprint != retrieval_set.fingerprint:
      raise GenerateError(f"the grant is for dataset {grant.fingerprint}, not for the retrieval "
                          f"set {retrieval_set.fingerprint}")
    if grant.count != len(prompts):
      raise GenerateError(f"the grant covers {grant.count} queries, not {len(prompts)} prompts")
    m = grant.mechanism
    return self._retrieve_and_draw(table, prompts, grant.keys(keys_lib.Stream.SUBSAMPLE),
                                   grant.keys(keys_lib.Stream.NOISE), m.sampling_rate,
                                   m.num_neighbors, m.noise_std, sample_key, rows,
                                   interpolation, guidance_scale)

  def _generate_free(self, mode: str, prompts: list[str], sample_key: jax.Array,
                     table: Optional[Table], rows: int, k: Optional[int] = None,
                     interpolation: Optional[float] = None,
                     guidance_scale: Optional[float] = None) -> np.ndarray:
    """Images for the modes that spend no budget: "public" and "nonprivate" (q = 1, sigma = 0:
    every record is in every subsample, so the keys are the seed's) and "none". Not public:
    `generate` is the way in, and it refuses "nonprivate" unless it is asked for explicitly."""
    if mode == "none":
      _, values = self.embed_prompts(prompts)
      (values,) = self._pad(rows, jnp.asarray(values))
      return self._finish(self._program("none", rows)(
          self.params, values, sample_key, self._guidance(guidance_scale)), len(prompts))
    if mode not in ("public", "nonprivate"):
      raise GenerateError(f"_generate_free takes 'public', 'nonprivate' or 'none', not {mode!r}")
    n = len(prompts)
    fixed = keys_lib.query_keys(self.config.seed, 0, n, keys_lib.Stream.SUBSAMPLE)
    return self._retrieve_and_draw(table, prompts, fixed, fixed, 1.0,
                                   k or self.config.privacy.num_neighbors, 0.0, sample_key, rows,
                                   interpolation, guidance_scale)

  def _guidance(self, guidance_scale: Optional[float]) -> jax.Array:
    return jnp.float32(self.config.diffusion.guidance_scale if guidance_scale is None
                       else guidance_scale)

  def _retrieve_and_draw(self, table, prompts, subsample_keys, noise_keys, sampling_rate, k,
                         noise_std, sample_key, rows, interpolation=None,
                         guidance_scale=None) -> np.ndarray:
    rows = rows or self.run_batch_size(len(prompts))
    text, values = self.embed_prompts(prompts)
    queries, values, subsample_keys, noise_keys = self._pad(rows,
        jnp.asarray(self.queries(text, values)), jnp.asarray(values), subsample_keys, noise_keys)
    interpolation = jnp.float32(self.config.privacy.interpolation if interpolation is None
                                else interpolation)
    if isinstance(table, host.HostRetriever):
      found = table.retrieve(np.asarray(queries), subsample_keys, sampling_rate, k)
      out = self._program("aggregate", rows)(
          self.params, found.embeddings, found.valid, values, noise_keys, jnp.float32(noise_std),
          interpolation, sample_key, self._guidance(guidance_scale))
    else:
      out = self._program("retrieve", rows, sampling_rate, k)(
          self.params, table, queries, values, subsample_keys, noise_keys,
          jnp.float32(noise_std), interpolation, sample_key, self._guidance(guidance_scale))
    return self._finish(out, len(prompts))

  def _finish(self, images: jax.Array, n: int) -> np.ndarray:
    return sample.to_uint8(np.asarray(images)[:n])


def _check_generator(gen: Generator, config: ml_collections.ConfigDict) -> None:
  """GenerateError unless `gen` was built for what `config` asks of the model: a generator may
  serve configs that differ in the privacy settings, lambda and the guidance scale (arguments of
  its programs), never in the model, its checkpoint, the towers or the sampler."""
  mine, theirs = gen.config, config
  differ = [name for name in ("seed", "model", "data", "embed", "encoder", "mesh")
            if mine.get(name) != theirs.get(name)]
  if (mine.generate.checkpoint or mine.train.workdir) != (theirs.generate.checkpoint
                                                           or theirs.train.workdir):
    differ.append("checkpoint")
  skip = {"guidance_scale"}
  if {k: v for k, v in mine.diffusion.items() if k not in skip} != {
      k: v for k, v in theirs.diffusion.items() if k not in skip}:
    differ.append("diffusion")
  if differ:
    raise GenerateError(f"the generator was built for another config ({', '.join(differ)} "
                        "differ); build one for this config")


def _check_settings(config: ml_collections.ConfigDict,
                    retrieval_set: Optional["RetrievalSet"]) -> None:
  """GenerateError (or the sampler's InputError) for a setting the run would fail on after its
  first charge: DDIM steps, eta and x0 clipping, lambda outside [0, 1], a guidance scale that is
  not finite, a batch size below 1, and k above the records of the retrieval set. (sample_steps=0
  and eta=2 were refused by the sampler only after a query had been charged.)"""
  d, p = config.diffusion, config.privacy
  sampler.check_settings(d.timesteps, d.sample_steps, d.eta, d.clip_x0)
  if not 0.0 <= p.interpolation <= 1.0:
    raise GenerateError(f"config.privacy.interpolation (lambda) must lie in [0, 1], got "
                        f"{p.interpolation}")
  if not math.isfinite(d.guidance_scale):
    raise GenerateError(f"config.diffusion.guidance_scale must be finite, got {d.guidance_scale}")
  if config.generate.batch_size < 1:
    raise GenerateError(f"config.generate.batch_size must be >= 1, got "
                        f"{config.generate.batch_size}")
  if retrieval_set is not None and not 1 <= p.num_neighbors <= retrieval_set.size:
    raise GenerateError(f"config.privacy.num_neighbors (k) must lie in [1, {retrieval_set.size:,}]"
                        f" (the records of the retrieval set), got {p.num_neighbors:,}")


def _mechanism(config) -> accounting.Mechanism:
  p = config.privacy
  return accounting.Mechanism(p.noise_std, p.sampling_rate, p.num_neighbors)


def _delta(config, size: int) -> float:
  return config.privacy.delta if config.privacy.delta is not None else 1.0 / size


def _done(out: pathlib.Path, prompts: list[str], mode: str) -> list[bool]:
  """Which prompts already have their record in `out`; GenerateError if a record there is for
  another prompt or mode (a rerun must repeat the run it continues)."""
  done = []
  for i, prompt in enumerate(prompts):
    path = out / f"{i:05d}.json"
    if path.exists():
      try:
        record = json.loads(path.read_text())
      except (OSError, ValueError) as e:
        raise GenerateError(f"{path} is not a record of `generate` ({e}); choose another "
                            "--out") from None
      if not isinstance(record, dict):
        raise GenerateError(f"{path} is not a record of `generate`; choose another --out")
      if (record.get("prompt"), record.get("mode")) != (prompt, mode):
        raise GenerateError(f"{out} holds image {i} of another run ({record.get('mode')}, "
                            f"{record.get('prompt')!r}); choose another --out")
    done.append(path.exists())
  return done


def _write(out: pathlib.Path, index: int, image: np.ndarray, record: dict) -> None:
  """The PNG, then the JSON record (its presence marks the prompt done), each atomically."""
  png = out / f"{index:05d}.png"
  sample.write_png(image, png.with_suffix(".tmp.png"))
  png.with_suffix(".tmp.png").replace(png)
  tmp = out / f"{index:05d}.json.tmp"
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(out / f"{index:05d}.json")


def generate(config: ml_collections.ConfigDict, prompts: Sequence[str], out, mode: str = "private",
             ledger_path: Optional[str] = None, allow_nonprivate: bool = False,
             generator: Optional[Generator] = None, progress: bool = True) -> dict:
  """Generates one image per prompt into `out` (module docstring); returns a summary.

  Private mode charges config.privacy's (sigma, q, k) per batch to the ledger at `ledger_path`
  (default config.generate.ledger; created, and the private set registered with
  config.privacy.epsilon_budget at delta = config.privacy.delta or 1/N, if new). Raises
  GenerateError for bad prompts or modes, ledger.BudgetExceededError when the budget cannot cover
  the next batch (the batches before it are written and stay charged).
  """
  if mode not in MODES:
    raise GenerateError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
  if mode == "nonprivate" and not allow_nonprivate:
    raise GenerateError("mode 'nonprivate' retrieves from the private set without subsampling or "
                        "noise (epsilon = infinity); it is for comparison only and must be asked "
                        "for explicitly (allow_nonprivate=True, --allow-nonprivate)")
  if config.generate.retrieval not in RETRIEVAL:  # before anything is charged
    raise GenerateError(f"config.generate.retrieval must be one of {', '.join(RETRIEVAL)}, got "
                        f"{config.generate.retrieval!r}")
  out = errors.make_directory(out)  # before the model loads and anything is charged
  gen = generator or Generator(config)
  _check_generator(gen, config)
  prompts = gen.check_prompts(prompts)
  with _exclusive(out):
    return _run(config, gen, prompts, out, mode, ledger_path, progress)


def _exclusive(out: pathlib.Path):
  """An exclusive lock on OUT (OUT/.lock, fcntl), held while a run writes there; GenerateError,
  before anything is charged, if another run holds it. Two runs into one OUT would otherwise both
  charge for the same missing images and overwrite each other's. The lock dies with its process,
  so a crashed run leaves nothing to clean up."""
  handle = open(out / ".lock", "a")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.close()
    raise GenerateError(f"another `generate` is writing to {out}; wait for it or choose another "
                        "--out") from None
  return handle  # closing it (the with statement) releases the lock


def _run(config: ml_collections.ConfigDict, gen: "Generator", prompts: list[str],
         out: pathlib.Path, mode: str, ledger_path: Optional[str], progress: bool) -> dict:
  """`generate`'s work once OUT is locked: the ledger, the batches, the records and the grid."""
  g = config.generate
  todo = [i for i, done in enumerate(_done(out, prompts, mode)) if not done]

  book = table = retrieval_set = None
  privacy = {}
  by_caption = config.embed.key == "caption"
  if mode in ("private", "nonprivate"):  # manifests only, until the first charge
    retrieval_set = RetrievalSet(g.private_keys if by_caption else g.private_values,
                                 g.private_values)
  elif mode == "public":
    retrieval_set = RetrievalSet(g.public_keys if by_caption else g.public_values,
                                 g.public_values)
  _check_settings(config, retrieval_set)  # nothing is charged for a run that cannot finish
  if mode == "private":
    book = ledger_lib.Ledger(ledger_path or g.ledger, create=True)
    delta = _delta(config, retrieval_set.size)
    budget = book.register(retrieval_set.fingerprint, config.privacy.epsilon_budget, delta,
                           config.privacy.accountant)
    privacy.update(delta=budget.delta, accountant=budget.accountant, adjacency=ADJACENCY,
                   dataset=retrieval_set.fingerprint, epsilon_budget=budget.epsilon_budget)
  elif mode == "nonprivate":
    privacy.update(epsilon="inf", note="epsilon = infinity: no subsample, no noise; comparison "
                   "only, never released as private", dataset=retrieval_set.fingerprint)
  else:
    privacy.update(epsilon=0.0, note="no private data is used")
  if mode != "private" and retrieval_set is not None:
    table = retrieval_set.table(gen.mesh, g.retrieval)

  p, d = config.privacy, config.diffusion
  retrieval = {"private": (p.num_neighbors, p.sampling_rate, p.noise_std, p.interpolation),
               "none": (None, None, None, 0.0)}.get(mode, (p.num_neighbors, 1.0, 0.0,
                                                           p.interpolation))
  settings = dict(zip(("k", "q", "sigma", "interpolation"), retrieval),
                  guidance_scale=d.guidance_scale, eta=d.eta, sample_steps=d.sample_steps,
                  clip_x0=d.clip_x0, seed=config.seed, checkpoint_step=gen.checkpoint_step)
  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="image",
                  file=sys.stderr, dynamic_ncols=True, mininterval=1.0, disable=not progress)
  start, written = time.perf_counter(), 0
  try:
    rows = gen.run_batch_size(len(todo))
    for lo in range(0, len(todo), rows):
      batch = todo[lo:lo + rows]
      texts = [prompts[i] for i in batch]
      sample_key = jax.random.fold_in(jax.random.key(config.seed), batch[0])
      if mode == "private":
        grant = book.charge(retrieval_set.fingerprint, _mechanism(config), len(batch))
        if table is None:  # the first private read, after the first charge
          table = retrieval_set.table(gen.mesh, g.retrieval)
        images = gen.generate_private(grant, retrieval_set, table, texts, sample_key, rows,
                                      p.interpolation, d.guidance_scale)
        (spent,) = book.status(grant.fingerprint)
        per = [dict(query=grant.first_query + j, epsilon_spent=spent.epsilon_spent,
                    epsilon_remaining=spent.epsilon_remaining) for j in range(len(batch))]
      else:
        images = gen._generate_free(mode, texts, sample_key, table, rows, p.num_neighbors,
                                    p.interpolation, d.guidance_scale)
        per = [dict(query=None) for _ in batch]
      for j, i in enumerate(batch):
        record = dict(prompt=prompts[i], image=f"{i:05d}.png", index=i, mode=mode, **settings,
                      **privacy,
                      **per[j], sample_key=f"fold_in(key({config.seed}), {batch[0]})")
        _write(out, i, images[j], record)
      written += len(batch)
      bar.update(len(batch))
    if book is not None:
      (spent,) = book.status(retrieval_set.fingerprint)
      privacy.update(epsilon_spent=spent.epsilon_spent, epsilon_remaining=spent.epsilon_remaining,
                     queries_charged=spent.queries)
  finally:
    bar.close()
    if book is not None:
      book.close()
  _write_jsonl(out, len(prompts))
  _write_grid(out, prompts)
  seconds = time.perf_counter() - start
  return dict(out=str(out), mode=mode, prompts=len(prompts), generated_now=written,
              seconds=seconds, images_per_second=written / max(seconds, 1e-9),
              batch_size=gen.run_batch_size(len(todo)), devices=gen.mesh.size, **privacy)


GRID_COLUMNS = 8


def _write_grid(out: pathlib.Path, prompts: list[str]) -> None:
  """OUT/grid.png: one row per distinct prompt (in order), its first GRID_COLUMNS images."""
  rows: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    rows.setdefault(p, [])
    if len(rows[p]) < GRID_COLUMNS:
      rows[p].append(i)
  images = [[sample.read_png(out / f"{i:05d}.png") for i in row] for row in rows.values()]
  sample.write_png(sample.grid(images), out / "grid.png")


def _write_jsonl(out: pathlib.Path, n: int) -> None:
  lines = [(out / f"{i:05d}.json").read_text() for i in range(n)]
  tmp = out / "records.jsonl.tmp"
  tmp.write_text("".join(json.dumps(json.loads(line)) + "\n" for line in lines))
  tmp.replace(out / "records.jsonl")

