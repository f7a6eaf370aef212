"""Orbax checkpoints: the one helper every trainer saves, resumes and restores through.

A run's work directory holds WORKDIR/checkpoints/STEP/state, the trainer's whole train state (a
nested dict of arrays: training.py), and WORKDIR/checkpoints/STEP/meta, a JSON record (the step
and the config), for the steps kept. Orbax writes a step into a temporary directory and renames it
once complete, so the latest step is always a whole checkpoint: a run killed while writing resumes
from the step before.

Restores go through abstract arrays (jax.ShapeDtypeStruct, with a sharding where the tree carries
one), so a checkpoint written on one mesh restores onto another (8 devices onto 1). A reader of a
finished run (`restore_latest`) restores only the part of the state it names (the EMA, the image
tower).

A release (release.py) is not a run: it holds one pytree in a directory of its own (`save_tree`,
`restore_tree`).
"""

import pathlib
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

from dprdm_jax import errors

DIRECTORY = "checkpoints"
STATE = "state"
META = "meta"


class Checkpoints:
  """The checkpoints of one run in WORKDIR/checkpoints, saved asynchronously (the arrays are
  copied to the host before `step_done` returns, so the next step may donate them).

  Saves happen at every multiple of `every`, at step `last` (the end of training), at
  `stop_after` (a planned stop, for tests of resuming) and when the cluster signals a preemption
  (orbax's preemption check, on every process at once); `step_done` says when the loop must stop.
  At most `keep` steps stay on disk.
  """

  def __init__(self, workdir, *, every: int, last: int, keep: int,
               stop_after: Optional[int] = None):
    if every < 1 or keep < 1:
      raise errors.InputError(f"checkpoint_every and keep_checkpoints must be >= 1, got {every} "
                              f"and {keep}")
    self.every, self.last, self.stop_after = every, last, stop_after
    self._directory = pathlib.Path(workdir).absolute() / DIRECTORY
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=keep,
                                             enable_async_checkpointing=True))

  def restore(self, abstract_state: Any) -> tuple[int, Optional[Any]]:
    """(step, state) of the latest complete checkpoint, restored onto the shapes and shardings of
    `abstract_state` (which must have the saved state's structure); (0, None) when there is
    none."""
    step = self._manager.latest_step()
    if step is None:
      return 0, None
    _check_layout(self._directory, step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))
    return step, restored[STATE]

  def step_done(self, step: int, state: Any, meta: Callable[[int], dict]) -> bool:
    """Saves `state` and meta(step) (a JSON record, made only when saving) as `step` if it is
    due; True when the loop must stop after this step (stop_after or a preemption), its
    checkpoint then under way."""
    stop = step == self.stop_after or self._manager.reached_preemption(step)
    if step % self.every == 0 or step == self.last or stop:
      self._manager.save(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta(step))}))
    return stop

  def close(self) -> None:
    """Waits for the pending save, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_layout(directory: pathlib.Path, step: int) -> None:
  """InputError unless checkpoint `step` holds a train state item (older trainers saved others)."""
  if not (directory / str(step) / STATE).is_dir():
    raise errors.InputError(f"{directory / str(step)} holds no {STATE!r} item: a checkpoint of an "
                            "older layout; train again in a fresh work directory")


def restore_latest(workdir, abstract: dict) -> Optional[tuple[int, dict]]:
  """(step, part of the state) of the latest complete checkpoint in `workdir`, or None when it
  holds none. `abstract` is a part of the state's nested dict (entries left out are not read),
  restored onto its shapes and shardings. Reads only: nothing is created or deleted."""
  directory = pathlib.Path(workdir).absolute() / DIRECTORY
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(directory,
                             options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    _check_layout(directory, step)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)}))
  return step, restored[STATE]


def save_tree(path, tree: Any) -> None:
  """Writes one pytree of arrays into the new directory `path`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(pathlib.Path(path).absolute(), tree)


def restore_tree(path, abstract: Any) -> Any:
  """The pytree `save_tree` wrote into `path`, restored onto the abstract arrays `abstract`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(pathlib.Path(path).absolute(), abstract)
