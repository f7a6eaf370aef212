"""The device mesh and the logical-axis rules that place parameters and batches on it.

Mesh axes, all of them always present (size 1 when unused):
  data    pure data parallelism: batch split, parameters replicated
  fsdp    data parallelism with sharded parameters and optimizer state (ZeRO-3 style): the batch
          is split over data x fsdp, parameter dimensions named by the rules are split over fsdp
  tensor  model parallelism of the dimensions the rules name (attention heads, MLP width)

config.mesh gives each axis a size; one axis may be -1, meaning all remaining devices.
config.logical_rules is a table of (logical axis name, mesh axis or None). Every parameter of the
model carries logical names (models/unet.py, LOGICAL_AXES); a name maps to the rule's mesh axis,
and a name without a rule stays replicated. The table is checked as a whole: an unknown logical
name or mesh axis, or one logical name given two different mesh axes, is an error, as is a
parameter with two dimensions on one mesh axis. A dimension that its mesh axis does not divide
(e.g. a first convolution's 1 input channel over fsdp = 8) is replicated and reported by
`param_shardings`, so a user sees every exception to the table.
"""

import math
from typing import Any, Optional, Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dprdm_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class ShardingError(errors.InputError):
  """A mesh or rule table that cannot be applied."""


def make_mesh(shape, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes MESH_AXES sized by `shape` (a mapping)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"mesh sizes must be positive, with at most one -1; got {dict(shape)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise ShardingError(f"{len(devices)} devices do not divide into the fixed mesh axes "
                          f"({fixed} devices)")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_rules(rules, vocabulary: Sequence[str]) -> dict[str, Optional[str]]:
  """The rule table as a dict; ShardingError for an unknown name or axis, or a conflict."""
  table: dict[str, Optional[str]] = {}
  for rule in rules:
    if len(rule) != 2:
      raise ShardingError(f"a logical rule is (logical name, mesh axis or None), got {rule!r}")
    name, axis = rule
    if name not in vocabulary:
      raise ShardingError(f"logical rule for unknown axis name {name!r}; the model's names are "
                          f"{tuple(vocabulary)}")
    if axis is not None and axis not in MESH_AXES:
      raise ShardingError(f"logical rule {name!r} -> {axis!r}: no such mesh axis {MESH_AXES}")
    if name in table and table[name] != axis:
      raise ShardingError(f"conflicting rules for {name!r}: {table[name]!r} and {axis!r}")
    table[name] = axis
  return table


def partition_spec(names: Sequence[Optional[str]], shape: Sequence[int],
                   table: dict[str, Optional[str]], mesh: Mesh) -> tuple[P, list[str]]:
  """The PartitionSpec of one parameter, and notes for dimensions left replicated."""
  if len(names) != len(shape):
    raise ShardingError(f"logical names {tuple(names)} do not match the shape {tuple(shape)}")
  wanted = [table.get(name) if name is not None else None for name in names]
  used = [a for a in wanted if a is not None]
  # Checked before sizes enter, so that a table valid on one device is valid on a pod.
  if len(used) != len(set(used)):
    raise ShardingError(f"logical names {tuple(names)} put two dimensions on one mesh axis "
                        f"({wanted}); change the rules")
  axes, notes = [], []
  for name, size, axis in zip(names, shape, wanted):
    if axis is not None and size % mesh.shape[axis]:
      notes.append(f"{name} ({size}) not divisible by {axis} ({mesh.shape[axis]}): replicated")
      axis = None
    axes.append(None if axis is None or mesh.shape[axis] == 1 else axis)
  return P(*axes), notes


def param_shardings(logical_names: Any, abstract_params: Any, rules, vocabulary: Sequence[str],
                    mesh: Mesh) -> tuple[Any, list[str]]:
  """NamedShardings for a parameter tree from its logical names; plus the replication notes.

  logical_names and abstract_params are trees of the same structure: tuples of names, and
  arrays or jax.ShapeDtypeStructs.
  """
  table = check_rules(rules, vocabulary)
  notes: list[str] = []

  def one(path, names, leaf):
    spec, leaf_notes = partition_spec(names, leaf.shape, table, mesh)
    notes.extend(f"{jax.tree_util.keystr(path)}: {n}" for n in leaf_notes)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(
      one, logical_names, abstract_params, is_leaf=lambda x: isinstance(x, tuple))
  return shardings, notes


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of a global batch -> global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
