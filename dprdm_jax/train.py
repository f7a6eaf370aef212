"""`dprdm train`: the retrieval-augmented U-Net on public data, one program from a CPU to a pod.

Read top to bottom: mesh, data, model and optimizer, the update step, checkpoints, the loop.

- Sharding: `jax.jit` with NamedShardings on a mesh from config.mesh (sharding.py). The batch is
  split over the data and fsdp axes; each parameter (and its optimizer and EMA state) is placed by
  config.logical_rules. The train state is donated, and the step compiles once.
- Multi-host: the command line calls jax.distributed.initialize() first; each process reads its
  share of every global batch (data/pipeline.py) and hands it over with
  make_array_from_process_local_data.
- Conditioning ("Adapt", SPEC section 3): the mean of each image's k public training neighbours
  (itself included, retrieval/public.py) plus N(0, s^2 I), s ~ U(0, sigma_max], one token; with
  probability p_uncond the context is zero, so classifier-free guidance has a trained
  unconditional branch.
- Checkpoints (orbax, async): train state (step, parameters, EMA, optimizer) and a JSON record of
  the data position and the config, every checkpoint_every steps, on preemption, and at the end.
  A rerun in the same work directory resumes from the latest complete checkpoint; the data
  stream and every random draw are functions of (seed, step), so a resumed run continues exactly
  as an uninterrupted one. Restoring goes through abstract arrays that carry the current mesh's
  shardings, so a checkpoint from 8 devices restores onto 1.
- Metrics: loss, learning rate, gradient norm, steps/s and examples/s, as TensorBoard events and
  a JSON-lines file written by process 0; a progress bar with the ETA on a terminal.
"""

import json
import math
import pathlib
import sys
import time
from typing import Any, Optional

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dprdm_jax import curves
from dprdm_jax import embed
from dprdm_jax import sharding
from dprdm_jax.data import pipeline
from dprdm_jax.diffusion import conditioning
from dprdm_jax.diffusion import loss as loss_lib
from dprdm_jax.diffusion import schedule as schedule_lib
from dprdm_jax.models import unet
from dprdm_jax.retrieval import public
from dprdm_jax.retrieval import store as store_lib


def model_config(config: ml_collections.ConfigDict) -> unet.UNetConfig:
  fields = config.model.to_dict()
  fields["channel_mult"] = tuple(fields["channel_mult"])
  fields["attention_resolutions"] = tuple(fields["attention_resolutions"])
  return unet.UNetConfig(**fields)


def noise_schedule(config: ml_collections.ConfigDict) -> schedule_lib.Schedule:
  d = config.diffusion
  if d.schedule == "linear":
    return schedule_lib.linear(d.timesteps, d.beta_start, d.beta_end)
  if d.schedule == "cosine":
    return schedule_lib.cosine(d.timesteps)
  raise ValueError(f"diffusion.schedule must be 'linear' or 'cosine', got {d.schedule!r}")


class NeighbourContext:
  """Adds each record's k public neighbours' embeddings (b, k, d) to a batch; scales images."""

  def __init__(self, source, embeddings_dir, k: int):
    store = store_lib.EmbeddingStore(embeddings_dir)
    self._ids = store.ids
    ids = np.asarray(source.ids, np.int64)
    if not np.isin(ids, self._ids).all():
      raise ValueError(f"the store {embeddings_dir} does not hold every record of {source.name}; "
                       "embed the same dataset split (`dprdm embed`)")
    self._embeddings = np.asarray(store.embeddings, np.float32)
    self._neighbors = public.training_neighbors(store, k)
    self.dim = store.dim

  def __call__(self, batch: dict) -> dict:
    rows = np.searchsorted(self._ids, batch["id"].astype(np.int64))
    return dict(image=batch["image"].astype(np.float32) / 127.5 - 1.0,
                neighbors=self._embeddings[self._neighbors[rows]])


def optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  t = config.train
  learning_rate = optax.warmup_constant_schedule(0.0, t.learning_rate, t.warmup_steps)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(learning_rate, weight_decay=t.weight_decay))
  return tx, learning_rate


class Trainer:
  """The compiled pieces of a run on one mesh: init, the update step, and their shardings."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.model_config = model_config(config)
    self.schedule = noise_schedule(config)
    self.tx, self.learning_rate = optimizer(config)
    t, d = config.train, config.diffusion

    def build(seed):
      return unet.UNet(self.model_config, unet.init_rngs(seed))

    abstract = nnx.eval_shape(lambda: build(0))
    self.graphdef, param_state, _ = nnx.split(abstract, nnx.Param, ...)
    # The rest is the dropout layers' own RNG state, unused (each step passes its dropout key);
    # it is made concrete once so that the model can be merged inside jit.
    self._rest = jax.jit(lambda: nnx.split(build(0), nnx.Param, ...)[2],
                         compiler_options=_run_once_options())()
    # The train state holds parameters as plain nested dicts: one tree shape for optax, orbax
    # and the sharding rules.
    abstract_params = _pure(param_state)
    logical_names = _pure(param_state, lambda v: tuple(v.get_metadata("out_sharding")))
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    param_shardings, self.notes = sharding.param_shardings(
        logical_names, abstract_params, config.logical_rules, unet.LOGICAL_AXES, mesh)
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = dict(step=replicated, params=param_shardings, ema=param_shardings,
                                opt=opt_shardings)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
             ema=abstract_params, opt=abstract_opt), self.state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)

    def init(seed):
      params = _pure(nnx.split(build(seed), nnx.Param, ...)[1])
      return dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                  opt=self.tx.init(params))

    self.init = jax.jit(init, static_argnums=0, out_shardings=self.state_shardings,
                        compiler_options=_run_once_options())
    run_key = jax.random.key(t.seed)
    deterministic = self.model_config.dropout == 0

    def train_step(state, batch):
      key = jax.random.fold_in(run_key, state["step"])
      context_key, loss_key, dropout_key = jax.random.split(key, 3)
      context = conditioning.adapt_context(context_key, batch["neighbors"], d.sigma_max,
                                           d.p_uncond)

      def loss_fn(params):
        model = self.model(params)
        rngs = nnx.Rngs(dropout=dropout_key)
        eps_fn = lambda x, tt, c: model(x, tt, c, deterministic=deterministic, rngs=rngs)
        return loss_lib.diffusion_loss(eps_fn, self.schedule, batch["image"], context, loss_key)

      loss, grads = jax.value_and_grad(loss_fn)(state["params"])
      updates, opt = self.tx.update(grads, state["opt"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      ema = loss_lib.ema_update(state["ema"], params,
                                loss_lib.ema_decay(state["step"], t.ema_decay))
      metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                     learning_rate=self.learning_rate(state["step"]))
      return dict(step=state["step"] + 1, params=params, ema=ema, opt=opt), metrics

    self.train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  def model(self, params: dict) -> unet.UNet:
    """The U-Net with the given parameters (e.g. the EMA), a nested dict as in the state."""
    return nnx.merge(self.graphdef, nnx.State(params), self._rest)


def _run_once_options() -> Optional[dict]:
  """XLA options for programs that run once (initialisation): on CPU, skip the optimisation
  passes, which cost minutes on the unrolled random-number code of a U-Net's initialisers."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _pure(state: nnx.State, leaf=lambda v: v.get_value()) -> dict:
  """An nnx.State as a nested dict of leaf(variable)."""
  return traverse_util.unflatten_dict({path: leaf(v) for path, v in nnx.to_flat_state(state)})


def _checkpoint_manager(workdir: pathlib.Path, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=config.train.keep_checkpoints,
      enable_async_checkpointing=True))


def restore(trainer: Trainer, workdir) -> Optional[dict]:
  """The latest train state in `workdir` placed on `trainer`'s mesh, or None if there is none."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with _checkpoint_manager(pathlib.Path(workdir).absolute(), trainer.config) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state)))
  return restored["state"]


class _Metrics:
  """JSON lines and TensorBoard events from process 0, and a progress line.

  Each record's loss is the mean over the steps since the previous record (kept on device until
  then, so logging adds no per-step synchronisation); the other values are the record's step's.
  """

  def __init__(self, workdir: pathlib.Path, total: int, start: int, examples_per_step: int):
    self._on = jax.process_index() == 0
    self._examples = examples_per_step
    self._last = (start, time.perf_counter())
    self._losses = []
    self._workdir = workdir
    self._bar = None
    if not self._on:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(str(workdir / "tensorboard"))
    self._jsonl = (workdir / "metrics.jsonl").open("a")
    if sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def restart_clock(self, step: int, metrics: dict) -> None:
    """Times steps/s from the end of `step` (its metrics given): called after the first step, so
    compilation is not counted."""
    jax.block_until_ready(metrics)
    self._last = (step, time.perf_counter())

  def add(self, metrics: dict) -> None:
    """Notes one step's metrics (device arrays; nothing waits for them here)."""
    self._losses.append(metrics["loss"])

  def write(self, step: int, metrics: dict) -> None:
    """Writes the record of `step`, whose metrics were the last `add`ed."""
    if not self._on:
      self._losses.clear()
      return
    # Fetching the values waits for the steps dispatched so far, so the clock is read after it.
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    record["loss"] = float(np.mean(jax.device_get(self._losses)))
    self._losses.clear()
    last_step, last_time = self._last
    now = time.perf_counter()
    steps_per_second = (step - last_step) / max(now - last_time, 1e-9)
    self._last = (step, now)
    record.update(step=step, steps_per_second=steps_per_second,
                  examples_per_second=steps_per_second * self._examples)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      if name != "step":
        self._writer.add_scalar(name, value, step)
    self._writer.flush()
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{record['loss']:.4f}",
                            ex_per_s=f"{record['examples_per_second']:.0f}")
    else:
      print(f"step {step}: loss {record['loss']:.4f}, lr {record['learning_rate']:.2e}, "
            f"grad norm {record['grad_norm']:.3f}, {record['examples_per_second']:,.0f} "
            "examples/s", file=sys.stderr, flush=True)

  def close(self) -> None:
    """Closes the files and plots the whole run's loss into WORKDIR/loss.svg."""
    if self._on:
      self._writer.close()
      self._jsonl.close()
      if self._bar is not None:
        self._bar.close()
      metrics = self._workdir / "metrics.jsonl"
      if metrics.stat().st_size:
        curves.write_loss_svg(metrics, self._workdir / "loss.svg",
                              f"dprdm train: loss, global batch {self._examples}")


def train(config: ml_collections.ConfigDict, workdir, stop_after: Optional[int] = None) -> dict:
  """Trains (or resumes) in `workdir` up to config.train.steps; returns a summary.

  stop_after: stop once this step's checkpoint is written, as a preemption there would.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  t = config.train
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)

  # Set up mesh
  mesh = sharding.make_mesh(config.mesh)
  trainer = Trainer(config, mesh)
  for note in trainer.notes:
    print(f"sharding: {note}", file=sys.stderr)

  # Data
  source = embed.open_source(config, config.data.public, "train")

  # Restore or initialise
  state = restore(trainer, workdir)
  start = 0 if state is None else int(state["step"])
  if state is None:
    state = trainer.init(t.seed)
  else:
    print(f"resumed from step {start}", file=sys.stderr)
  context = NeighbourContext(source, t.embeddings, t.num_neighbors)
  if context.dim != trainer.model_config.context_dim:
    raise ValueError(f"the store {t.embeddings} holds d = {context.dim} embeddings but the U-Net "
                     f"reads d = {trainer.model_config.context_dim} (config.model.context_dim)")
  batches = pipeline.TrainBatches(
      source, t.batch_size, t.seed, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), transform=context)

  # Loop
  manager = _checkpoint_manager(workdir, config)
  metrics_out = _Metrics(workdir, t.steps, start, t.batch_size)
  wall = time.perf_counter()
  step = start
  try:
    for local in batches:
      if step >= t.steps:
        break
      state, metrics = trainer.train_step(state, sharding.global_batch(local, mesh))
      metrics_out.add(metrics)
      step += 1
      if step == start + 1:  # the first call compiled the step
        metrics_out.restart_clock(step, metrics)
      if step % t.log_every == 0 or step == t.steps:
        metrics_out.write(step, metrics)
      preempted = manager.reached_preemption(step)
      if step % t.checkpoint_every == 0 or step in (t.steps, stop_after) or preempted:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(step=step, data_step=batches.step,
                                        config=config.to_json()))))
        if step == stop_after or preempted:
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    metrics_out.close()
  return dict(workdir=str(workdir), steps=step, started_at=start,
              seconds=time.perf_counter() - wall, parameters=trainer.num_params,
              devices=jax.device_count(),
              trained_steps_per_second=(step - start) / max(time.perf_counter() - wall, 1e-9),
              trace_count=trainer.train_step._cache_size())  # pylint: disable=protected-access
