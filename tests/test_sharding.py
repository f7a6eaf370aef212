"""Mesh construction and the logical-axis rule table (8 fake CPU devices)."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dprdm_jax import sharding

VOCABULARY = ("channels_in", "channels", "mlp", "heads", "norm")


def test_mesh_sizes():
  mesh = sharding.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]).shape) == {
      "data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("shape,message", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "fsdp": 3}, "do not divide"),
    ({"model": 8}, "unknown mesh axes"),
    ({"data": 0}, "must be positive"),
])
def test_bad_meshes(shape, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.make_mesh(shape)


@pytest.mark.parametrize("rules,message", [
    ([("channels", "fsdp"), ("channels", "tensor")], "conflicting rules for 'channels'"),
    ([("width", "fsdp")], "unknown axis name 'width'"),
    ([("channels", "model")], "no such mesh axis"),
    ([("channels",)], "a logical rule is"),
])
def test_bad_rules(rules, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.check_rules(rules, VOCABULARY)


def test_repeated_identical_rule_is_fine():
  assert sharding.check_rules([("mlp", "tensor"), ("mlp", "tensor"), ("norm", None)],
                              VOCABULARY) == {"mlp": "tensor", "norm": None}


def test_param_shardings_follow_rules_and_report_exceptions():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  names = {"conv": ("channels_in", "channels"), "mlp": ("channels", "mlp"), "scale": ("norm",)}
  params = {"conv": jax.ShapeDtypeStruct((1, 64), np.float32),
            "mlp": jax.ShapeDtypeStruct((64, 256), np.float32),
            "scale": jax.ShapeDtypeStruct((64,), np.float32)}
  rules = [("channels_in", "fsdp"), ("channels", None), ("mlp", "tensor")]
  shardings, notes = sharding.param_shardings(names, params, rules, VOCABULARY, mesh)
  assert shardings["mlp"].spec == P(None, "tensor")
  assert shardings["conv"].spec == P(None, None)  # 1 input channel cannot split over 4
  assert shardings["scale"].spec == P(None)
  assert notes == ["['conv']: channels_in (1) not divisible by fsdp (4): replicated"]
  placed = jax.device_put(np.ones((64, 256), np.float32), shardings["mlp"])
  assert placed.addressable_shards[0].data.shape == (64, 128)


def test_two_dimensions_on_one_axis_is_an_error():
  mesh = sharding.make_mesh({"fsdp": 8})
  with pytest.raises(sharding.ShardingError, match="two dimensions on one mesh axis"):
    sharding.param_shardings({"w": ("channels_in", "channels")},
                             {"w": jax.ShapeDtypeStruct((8, 8), np.float32)},
                             [("channels_in", "fsdp"), ("channels", "fsdp")], VOCABULARY, mesh)


def test_names_must_match_rank():
  mesh = sharding.make_mesh({"fsdp": 8})
  with pytest.raises(sharding.ShardingError, match="do not match the shape"):
    sharding.param_shardings({"w": ("channels",)},
                             {"w": jax.ShapeDtypeStruct((8, 8), np.float32)},
                             [("channels", "fsdp")], VOCABULARY, mesh)


def test_global_batch_splits_over_data_and_fsdp():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  batch = sharding.global_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh)
  assert batch["x"].shape == (16, 1)
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 1)}
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(16, 1))
