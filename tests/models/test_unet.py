"""Tests of the retrieval-augmented U-Net: shapes, initial output, names, context, validation."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dprdm_jax.models import unet

# Small enough to compile in seconds: 8x8 maps, attention at both levels.
TINY = unet.UNetConfig(resolution=8, in_channels=2, out_channels=2, base_channels=8,
                       channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                       head_channels=8, transformer_depth=1, context_dim=8, norm_groups=4)


def _is_names(x):
  return isinstance(x, tuple)


def _forward(model):
  """A jitted forward taking the model's state, so perturbed states reuse one compilation."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)

  return state, forward


def _inputs(config, batch=2, tokens=1, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, config.resolution, config.resolution, config.in_channels))
  t = jax.random.randint(kt, (batch,), 0, 1000)
  context = jax.random.normal(kc, (batch, tokens, config.context_dim))
  return x, t, context


def _perturbed(model, seed=1):
  """The model with a random output convolution, so the output depends on everything before it."""
  kernel = model.conv_out.kernel
  kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed), kernel.shape, kernel.dtype)
  return model


@pytest.fixture(scope="module")
def tiny():
  """A perturbed tiny model and its jitted forward."""
  model = _perturbed(unet.UNet(TINY, nnx.Rngs(0)))
  state, forward = _forward(model)
  return model, state, forward


@pytest.mark.parametrize("config", [
    TINY,
    dataclasses.replace(TINY, resolution=16, in_channels=1, out_channels=3,
                        channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
                        transformer_depth=2, dropout=0.1),
    dataclasses.replace(TINY, resolution=16, channel_mult=(1, 1, 2),
                        attention_resolutions=(16, 4), dtype="bfloat16"),
    dataclasses.replace(TINY, attention_resolutions=()),
], ids=["tiny", "three-levels", "bfloat16", "middle-attention-only"])
def test_shapes(config):
  model = unet.UNet(config, nnx.Rngs(0))
  _, forward = _forward(model)
  state = nnx.state(_perturbed(model))
  for tokens in (1, 4):
    x, t, context = _inputs(config, batch=3, tokens=tokens)
    y = forward(state, x, t, context)
    assert y.shape == (3, config.resolution, config.resolution, config.out_channels)
    assert y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    assert np.abs(np.asarray(y)).max() > 0


def test_output_is_zero_at_init_and_not_after_perturbation(tiny):
  _, perturbed_state, forward = tiny
  fresh = unet.UNet(TINY, nnx.Rngs(3))
  x, t, context = _inputs(TINY)
  assert np.all(np.asarray(forward(nnx.state(fresh), x, t, context)) == 0)
  assert np.abs(np.asarray(forward(perturbed_state, x, t, context))).max() > 1e-3


def test_context_changes_the_output(tiny):
  _, state, forward = tiny
  x, t, context = _inputs(TINY)
  other = context + 1.0
  diff = np.abs(np.asarray(forward(state, x, t, context) - forward(state, x, t, other)))
  assert diff.max() > 1e-4


def test_k_identical_tokens_equal_one_token(tiny):
  _, state, forward = tiny
  x, t, context = _inputs(TINY, tokens=1)
  repeated = jnp.repeat(context, 4, axis=1)
  np.testing.assert_allclose(forward(state, x, t, context), forward(state, x, t, repeated),
                             atol=1e-5, rtol=1e-5)


def test_timestep_changes_the_output_and_may_be_float(tiny):
  _, state, forward = tiny
  x, t, context = _inputs(TINY)
  a = forward(state, x, t, context)
  assert np.abs(np.asarray(a - forward(state, x, t + 100, context))).max() > 1e-4
  np.testing.assert_allclose(a, forward(state, x, t.astype(jnp.float32), context), atol=1e-6)


def test_deterministic_needs_no_rng_and_dropout_acts_otherwise():
  config = dataclasses.replace(TINY, dropout=0.5)
  model = _perturbed(unet.UNet(config, nnx.Rngs(0)))
  x, t, context = _inputs(config)
  a = model(x, t, context)
  np.testing.assert_array_equal(a, model(x, t, context, deterministic=True))
  b = model(x, t, context, deterministic=False, rngs=nnx.Rngs(dropout=7))
  c = model(x, t, context, deterministic=False, rngs=nnx.Rngs(dropout=7))
  np.testing.assert_array_equal(b, c)  # the same masks from the same key
  assert np.abs(np.asarray(a - b)).max() > 1e-4
  # Without `rngs`, the model's own stream draws fresh masks at each call.
  d = model(x, t, context, deterministic=False)
  assert np.abs(np.asarray(d - model(x, t, context, deterministic=False))).max() > 1e-4


def _check_names(state, names):
  params = jax.tree.leaves(state)
  name_tuples = jax.tree.leaves(names, is_leaf=_is_names)
  assert len(params) == len(name_tuples)
  assert jax.tree.structure(state) == jax.tree.structure(
      jax.tree.map(lambda n: 0, names, is_leaf=_is_names))
  for param, axes in zip(params, name_tuples):
    assert len(axes) == param.ndim, (axes, param.shape)
    assert set(axes) <= set(unet.LOGICAL_AXES), axes
    assert len(set(axes)) == len(axes), axes  # one mesh axis cannot shard two axes


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, dropout=0.1),
                                    unet.OFFLINE_CONFIG, unet.PAPER_CONFIG],
                         ids=["tiny", "dropout", "offline", "paper"])
def test_every_parameter_has_logical_names_of_its_rank(config):
  model = nnx.eval_shape(lambda: unet.UNet(config, unet.init_rngs(0)))
  state = nnx.state(model, nnx.Param)
  _check_names(state, unet.logical_axes(model))
  _check_names(state, unet.logical_axes(state))


def test_flax_maps_the_names_with_a_rule_table():
  model = nnx.eval_shape(lambda: unet.UNet(TINY, unet.init_rngs(0)))
  rules = [("channels", "tensor"), ("heads", "tensor"), ("mlp", "tensor")]
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["conv_in"]["kernel"].get_value() == jax.P(None, None, None, "tensor")
  assert specs["norm_out"]["scale"].get_value() == jax.P(None)


def test_paper_config_has_about_400m_parameters():
  count = unet.param_count(unet.PAPER_CONFIG)
  assert abs(count - 400e6) / 400e6 < 0.05, count


def test_param_count_matches_a_built_model():
  model = unet.UNet(TINY, nnx.Rngs(0))
  built = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert unet.param_count(TINY) == built


def test_config_json_round_trip():
  assert unet.UNetConfig.from_json(unet.PAPER_CONFIG.to_json()) == unet.PAPER_CONFIG


@pytest.mark.parametrize("changes, message", [
    (dict(base_channels=10), "norm_groups"),
    (dict(norm_groups=3), "norm_groups"),
    (dict(head_channels=6), "head_channels"),
    (dict(attention_resolutions=(2,)), "not feature-map sizes"),
    (dict(resolution=6, channel_mult=(1, 2, 2), attention_resolutions=()), "halve"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(dtype="int32"), "floating-point"),
    (dict(param_dtype="float33"), "floating-point"),
    (dict(context_dim=0), "context_dim"),
])
def test_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **changes)


def test_call_rejects_wrong_shapes(tiny):
  model, _, _ = tiny
  x, t, context = _inputs(TINY)
  with pytest.raises(ValueError, match="context"):
    model(x, t, context[..., :4])
  with pytest.raises(ValueError, match="x must be"):
    model(x[:, :4], t, context)
