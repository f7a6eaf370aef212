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
- The trainers' shared idiom (training.py): the U-Net as an nnx graph with its parameters as a
  nested dict, a train state dict (step, parameters, EMA, optimizer) and one loop.
- Checkpoints (checkpoints.py, orbax, async): the train state and a JSON record of the data
  position and the config, every checkpoint_every steps, on preemption, and at the end. A rerun
  in the same work directory resumes from the latest complete checkpoint; the data stream and
  every random draw are functions of (seed, step), so a resumed run continues exactly as an
  uninterrupted one. Restoring goes through abstract arrays that carry the current mesh's
  shardings, so a checkpoint from 8 devices restores onto 1.
- Metrics (metrics_writer.py): loss, learning rate, gradient norm, steps/s and examples/s, as
  TensorBoard events and metrics.jsonl written by process 0, a progress bar with the ETA on a
  terminal, and the loss curve loss.svg at the end.
"""

import pathlib
import sys
import time
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dprdm_jax import checkpoints
from dprdm_jax import embed
from dprdm_jax import errors
from dprdm_jax import metrics_writer
from dprdm_jax import sharding
from dprdm_jax import training
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
  raise errors.InputError(f"diffusion.schedule must be 'linear' or 'cosine', got {d.schedule!r}")


class NeighbourContext:
  """Adds each record's k public neighbours' embeddings (b, k, d) to a batch; scales images."""

  def __init__(self, source, embeddings_dir, k: int):
    store = store_lib.EmbeddingStore(embeddings_dir)
    self._ids = store.ids
    ids = np.asarray(source.ids, np.int64)
    if not np.isin(ids, self._ids).all():
      raise errors.InputError(f"the store {embeddings_dir} does not hold every record of "
                              f"{source.name}; embed the same dataset split (`dprdm embed`)")
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
    # model(params): the U-Net with the given parameters (e.g. the EMA), a nested dict as in the
    # train state.
    self.model = training.NnxModel(lambda seed: unet.UNet(self.model_config, unet.init_rngs(seed)))
    abstract_params = self.model.abstract_params
    logical_names = self.model.param_tree(lambda v: tuple(v.get_metadata("out_sharding")))
    self.num_params = self.model.num_params
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
      state = training.init_state(self.model.init_params(seed), self.tx)
      return dict(state, ema=state["params"])

    self.init = jax.jit(init, static_argnums=0, out_shardings=self.state_shardings,
                        compiler_options=training.run_once_options())
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
      new = training.apply_gradients(state, grads, self.tx)
      new["ema"] = loss_lib.ema_update(state["ema"], new["params"],
                                       loss_lib.ema_decay(state["step"], t.ema_decay))
      metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                     learning_rate=self.learning_rate(state["step"]))
      return new, metrics

    self.train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)


def restore(trainer: Trainer, workdir) -> Optional[dict]:
  """The latest train state in `workdir` placed on `trainer`'s mesh, or None if there is none."""
  restored = checkpoints.restore_latest(workdir, trainer.abstract_state)
  return None if restored is None else restored[1]


def train(config: ml_collections.ConfigDict, workdir, stop_after: Optional[int] = None) -> dict:
  """Trains (or resumes) in `workdir` up to config.train.steps; returns a summary.

  stop_after: stop once this step's checkpoint is written, as a preemption there would.
  """
  t = config.train
  if t.steps < 1:  # --config.train.steps=-1 "trained to step 0" and wrote a work directory
    raise errors.InputError(f"config.train.steps must be >= 1, got {t.steps}")
  workdir = pathlib.Path(workdir).absolute()
  errors.make_directory(workdir)
  mesh = sharding.make_mesh(config.mesh)
  trainer = Trainer(config, mesh)
  for note in trainer.notes:
    print(f"sharding: {note}", file=sys.stderr)
  source = embed.open_source(config, config.data.public, "train")
  context = NeighbourContext(source, t.embeddings, t.num_neighbors)
  if context.dim != trainer.model_config.context_dim:
    raise errors.InputError(f"the store {t.embeddings} holds d = {context.dim} embeddings but the "
                            f"U-Net reads d = {trainer.model_config.context_dim} "
                            "(config.model.context_dim)")

  wall = time.perf_counter()
  with checkpoints.Checkpoints(workdir, every=t.checkpoint_every, last=t.steps,
                               keep=t.keep_checkpoints, stop_after=stop_after) as saved:
    start, state = training.restore_or_init(saved, trainer.abstract_state,
                                            lambda: trainer.init(t.seed))
    batches = pipeline.TrainBatches(
        source, t.batch_size, t.seed, start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count(), transform=context)
    with metrics_writer.MetricsWriter(workdir, name="dprdm train", total=t.steps, start=start,
                                      examples_per_step=t.batch_size) as metrics:
      state, step = training.run(
          lambda state, local: trainer.train_step(state, sharding.global_batch(local, mesh)),
          state, batches, start=start, total=t.steps, log_every=t.log_every, checkpoints=saved,
          metrics=metrics,
          meta=lambda step: dict(step=step, data_step=batches.step, config=config.to_json()))
  return dict(workdir=str(workdir), steps=step, started_at=start,
              seconds=time.perf_counter() - wall, parameters=trainer.num_params,
              devices=jax.device_count(),
              trained_steps_per_second=(step - start) / max(time.perf_counter() - wall, 1e-9),
              trace_count=trainer.train_step._cache_size())  # pylint: disable=protected-access
