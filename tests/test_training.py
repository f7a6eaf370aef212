"""The trainers' shared idiom (training.py, checkpoints.py, metrics_writer.py) on a tiny model: a
run stopped and resumed ends where an uninterrupted one does, compiling its step once; readers
restore a part of the state; the metrics records average the loss since the previous record."""

import functools
import itertools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dprdm_jax import checkpoints
from dprdm_jax import curves
from dprdm_jax import metrics_writer
from dprdm_jax import training


class _Scaled(nnx.Module):

  def __init__(self, seed: int):
    self.linear = nnx.Linear(3, 1, rngs=nnx.Rngs(seed))
    self.log_scale = nnx.Param(jnp.log(2.0))  # weak-typed, as a Python float makes it


def _batches(start: int):
  for step in itertools.count(start):
    x = np.random.default_rng([0, step]).normal(size=(4, 3)).astype(np.float32)
    yield x, x.sum(axis=1)


def _run(workdir, total: int = 6, stop_after=None):
  """(host state, step reached, compilations of the step) of a run in `workdir`."""
  model = training.NnxModel(_Scaled)
  tx = optax.adam(0.1)

  def init():
    return training.init_state(model.init_params(0), tx)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, batch):
    x, y = batch

    def loss_fn(params):
      m = model(params)
      return jnp.mean((m.linear(x)[:, 0] * jnp.exp(m.log_scale[...]) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    return training.apply_gradients(state, grads, tx), dict(loss=loss)

  with checkpoints.Checkpoints(workdir, every=2, last=total, keep=3,
                               stop_after=stop_after) as saved:
    start, state = training.restore_or_init(saved, jax.eval_shape(init), jax.jit(init))
    with metrics_writer.MetricsWriter(workdir, name="test", total=total, start=start,
                                      examples_per_step=4) as metrics:
      state, reached = training.run(step_fn, state, _batches(start), start=start, total=total,
                                    log_every=2, checkpoints=saved, metrics=metrics,
                                    meta=lambda step: dict(step=step))
  return jax.device_get(state), reached, step_fn._cache_size()  # pylint: disable=protected-access


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, _run(workdir)


def test_a_run_compiles_once_and_logs_checkpoints_and_plots(uninterrupted):
  workdir, (state, reached, compilations) = uninterrupted
  assert reached == 6 and int(state["step"]) == 6 and compilations == 1
  assert state["params"]["log_scale"] != np.log(2.0)  # trained
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
  meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert meta == dict(step=6)
  records = curves.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == [2, 4, 6]
  assert all(r["examples_per_second"] == 4 * r["steps_per_second"] for r in records)
  assert (workdir / "loss.svg").stat().st_size and any((workdir / "tensorboard").iterdir())


def test_a_stopped_run_resumes_to_the_uninterrupted_state(uninterrupted, tmp_path, capsys):
  _, (expected, _, _) = uninterrupted
  state, reached, _ = _run(tmp_path, stop_after=3)
  assert reached == 3 and int(state["step"]) == 3
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]
  state, reached, _ = _run(tmp_path)
  assert reached == 6 and "resumed from step 3" in capsys.readouterr().err
  _assert_equal(state, expected)
  assert [r["step"] for r in curves.read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6]
  state, reached, _ = _run(tmp_path)  # a finished run: restored, not trained further
  assert reached == 6
  _assert_equal(state, expected)


def test_a_reader_restores_the_part_of_the_state_it_names(uninterrupted, tmp_path):
  workdir, (expected, _, _) = uninterrupted
  abstract = {"params": {"linear": jax.eval_shape(lambda: expected["params"]["linear"])}}
  step, part = checkpoints.restore_latest(workdir, abstract)
  assert step == 6 and set(part) == {"params"} and set(part["params"]) == {"linear"}
  _assert_equal(part["params"]["linear"], expected["params"]["linear"])
  assert checkpoints.restore_latest(tmp_path, abstract) is None
  assert not (tmp_path / "checkpoints").exists()  # a reader creates nothing


def test_records_average_the_named_metrics_since_the_last_record(tmp_path):
  with metrics_writer.MetricsWriter(tmp_path, name="test", total=4, start=0, examples_per_step=2,
                                    mean_of=("loss", "accuracy")) as metrics:
    for loss, accuracy in ((1.0, 0.5), (3.0, 1.0)):
      metrics.add(dict(loss=jnp.float32(loss), accuracy=jnp.float32(accuracy)))
    metrics.write(2, dict(loss=jnp.float32(3.0), accuracy=jnp.float32(1.0),
                          learning_rate=jnp.float32(0.5)))
    metrics.add(dict(loss=jnp.float32(5.0), accuracy=jnp.float32(0.0)))
    metrics.write(3, dict(loss=jnp.float32(5.0), accuracy=jnp.float32(0.0),
                          learning_rate=jnp.float32(0.25)))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"], r["accuracy"], r["learning_rate"]) for r in records] == [
      (2, 2.0, 0.75, 0.5), (3, 5.0, 0.0, 0.25)]


def test_checkpoint_intervals_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="checkpoint_every"):
    checkpoints.Checkpoints(tmp_path, every=0, last=4, keep=1)


def test_a_checkpoint_without_a_train_state_is_refused_clearly(uninterrupted, tmp_path):
  workdir, (expected, _, _) = uninterrupted
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  older = tmp_path / "older"
  with ocp.CheckpointManager(older / "checkpoints") as manager:  # items as train_encoder's were
    manager.save(1, args=ocp.args.Composite(tower=ocp.args.StandardSave(expected["params"])))
  abstract = jax.eval_shape(lambda: expected)
  with pytest.raises(ValueError, match="older layout"):
    checkpoints.restore_latest(older, {"params": abstract["params"]})
  with checkpoints.Checkpoints(older, every=1, last=1, keep=1) as saved:
    with pytest.raises(ValueError, match="older layout"):
      saved.restore(abstract)
  assert checkpoints.restore_latest(workdir, {"params": abstract["params"]})[0] == 6
