"""The one idiom of the project's trainers: train.py (the U-Net), train_encoder.py (the image
tower) and evaluate/classifier.py (the evaluation classifier).

- The model: an nnx Module built abstractly once and split into its graph and its parameters
  (`NnxModel`); the parameters are a plain nested dict, one tree shape for optax, orbax and the
  sharding rules, and the step merges the module back inside jit.
- The train state: a dict of arrays, `step` (int32), `params` and the optax state `opt` (the
  U-Net adds its EMA, `ema`). The update is a pure function (state, batch) -> (state, metrics)
  under jax.jit, the state donated; its random draws are functions of (seed, step) and so are the
  batches, so a run resumed from a checkpoint continues as an uninterrupted one.
- The loop (`run`): one step per batch up to the last step; metrics_writer.MetricsWriter logs
  every `log_every` steps and at the end, checkpoints.Checkpoints saves at its intervals and
  stops the loop at stop_after or on a preemption.
"""

import math
import sys
from typing import Any, Callable, Iterable, Optional

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from dprdm_jax import checkpoints as checkpoints_lib
from dprdm_jax import metrics_writer


def run_once_options() -> Optional[dict]:
  """XLA options for programs that run once (initialisation): on CPU, skip the optimisation
  passes, which cost minutes on the unrolled random-number code of a U-Net's initialisers."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def pure(state: nnx.State, leaf=lambda v: v.get_value()) -> dict:
  """An nnx.State as a nested dict of leaf(variable)."""
  return traverse_util.unflatten_dict({path: leaf(v) for path, v in nnx.to_flat_state(state)})


class NnxModel:
  """An nnx Module as (graph, parameters as a nested dict), built from `build(seed)`.

  Nothing is computed at construction but the abstract shapes and the module's non-parameter
  state (dropout RNG counters: unused, as each step passes its own key; made concrete once so
  that the module can be merged inside jit).
  """

  def __init__(self, build: Callable[[int], nnx.Module]):
    self._build = build
    abstract = nnx.eval_shape(lambda: build(0))
    self.graphdef, self._abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    self._rest = jax.jit(lambda: nnx.split(build(0), nnx.Param, ...)[2],
                         compiler_options=run_once_options())()
    self.abstract_params = pure(self._abstract_params)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))

  def param_tree(self, leaf: Callable[[nnx.Variable], Any]) -> dict:
    """A nested dict shaped like the parameters, of leaf(variable) of each abstract parameter
    (e.g. its sharding metadata)."""
    return pure(self._abstract_params, leaf)

  def init_params(self, seed: int) -> dict:
    """The parameters of a fresh module drawn from `seed` (call it inside jit)."""
    return pure(nnx.split(self._build(seed), nnx.Param, ...)[1])

  def __call__(self, params: dict) -> nnx.Module:
    """The module with the given parameters (a nested dict as in the train state)."""
    return nnx.merge(self.graphdef, nnx.State(params), self._rest)


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  """The train state at step 0 of the parameters `params` (traceable).

  Weak-typed parameters (a Python float made an array) are made strongly typed: an update
  returns them strongly typed, and the changed type would compile the step a second time.
  """
  params = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), params)
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt=tx.init(params))


def apply_gradients(state: dict, grads: dict, tx: optax.GradientTransformation) -> dict:
  """The train state after one optax update by `grads` (other entries, e.g. the EMA, kept)."""
  updates, opt = tx.update(grads, state["opt"], state["params"])
  return dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
              opt=opt)


def restore_or_init(checkpoints: checkpoints_lib.Checkpoints, abstract_state: Any,
                    init: Callable[[], Any]) -> tuple[int, Any]:
  """(step, state) of the latest checkpoint (noted on stderr), else (0, init())."""
  start, state = checkpoints.restore(abstract_state)
  if state is None:
    return 0, init()
  print(f"resumed from step {start}", file=sys.stderr)
  return start, state


def run(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, batches: Iterable, *,
        start: int, total: int, log_every: int, checkpoints: checkpoints_lib.Checkpoints,
        metrics: metrics_writer.MetricsWriter, meta: Callable[[int], dict]) -> tuple[Any, int]:
  """Steps `state` from step `start` with one batch each up to step `total`; returns (state, the
  step reached), which is less than `total` when `checkpoints` stopped the loop.

  meta(step): the JSON record saved beside each checkpoint (made only when one is saved).
  """
  step = start
  for batch in batches:
    if step >= total:
      break
    state, values = step_fn(state, batch)
    metrics.add(values)
    step += 1
    if step == start + 1:  # the first call compiled the step
      metrics.restart_clock(step, values)
    if step % log_every == 0 or step == total:
      metrics.write(step, values)
    if checkpoints.step_done(step, state, meta):
      break
  return state, step
