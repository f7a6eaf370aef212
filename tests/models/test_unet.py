"""Tests of the retrieval-augmented U-Net: shapes, initial output, names, context, validation."""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dprdm_jax.models import unet

# Small enough to compile in seconds: 8x8 maps, attention at both levels. Its dropout acts only
# when a call asks for it.
TINY = unet.UNetConfig(resolution=8, in_channels=2, out_channels=2, patch_size=1, base_channels=8,
                       channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                       head_channels=8, transformer_depth=1, context_dim=8, norm_groups=4,
                       dropout=0.5)

# Compiling is most of these tests' time on two CPU cores; LLVM's optimisations are not needed.
_JIT_OPTIONS = {"xla_backend_optimization_level": 0}


def _build(config, seed=0):
  """A model initialised eagerly with a counter-based RNG: built op by op, threefry's key
  derivations would compile separately and dominate the test time."""
  return unet.UNet(config, nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")))


# Inputs and perturbations come from numpy: eager jax.random would compile a kernel per shape.
def _inputs(config, tokens=1, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, config.resolution, config.resolution, config.in_channels))
  t = rng.integers(0, 1000, size=batch)
  context = rng.normal(size=(batch, tokens, config.context_dim))
  return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32), jnp.asarray(context, jnp.float32)


def _perturbed(model, seed=1):
  """The model with a random output convolution, so the output depends on everything before it."""
  kernel = model.conv_out.kernel
  noise = 0.1 * np.random.default_rng(seed).normal(size=kernel.shape)
  kernel[...] = jnp.asarray(noise, kernel.dtype)
  return model


def _differ(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def _check_output(y, config, batch=2):
  assert y.shape == (batch, config.resolution, config.resolution, config.out_channels)
  assert y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  assert np.abs(np.asarray(y)).max() > 0


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, its state at init and perturbed, and one jitted forward for all states."""
  model = _build(TINY)
  graphdef, initial = nnx.split(model)
  initial = jax.tree.map(jnp.copy, initial)  # _perturbed changes the model's variables in place
  perturbed = nnx.state(_perturbed(model))

  @functools.partial(jax.jit, compiler_options=_JIT_OPTIONS)
  def forward(state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)

  return dict(model=model, graphdef=graphdef, initial=initial, state=perturbed, forward=forward)


def test_tiny_shapes_with_one_and_four_context_tokens(tiny):
  for tokens in (1, 4):
    _check_output(tiny["forward"](tiny["state"], *_inputs(TINY, tokens)), TINY)


@pytest.mark.parametrize("config, tokens", [
    (dataclasses.replace(TINY, in_channels=1, out_channels=3, patch_size=2,
                         channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,),
                         transformer_depth=2), 4),
    (dataclasses.replace(TINY, attention_resolutions=(), dtype="bfloat16"), 1),
], ids=["patched-three-levels", "bfloat16-middle-attention-only"])
def test_shapes_with_float_timesteps(config, tokens):
  graphdef, state = nnx.split(_perturbed(_build(config)))
  forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args),
                    compiler_options=_JIT_OPTIONS)
  x, t, context = _inputs(config, tokens)
  _check_output(forward(state, x, t.astype(jnp.float32), context), config)


def test_patches_fold_into_channels_and_back():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  folded = unet._fold(x, 2)
  assert folded.shape == (2, 2, 2, 12)
  np.testing.assert_array_equal(folded[0, 1, 0], x[0, 2:4, 0:2].reshape(-1))
  np.testing.assert_array_equal(unet._unfold(folded, 2), x)


def test_output_is_zero_at_init_and_not_after_perturbation(tiny):
  args = _inputs(TINY)
  assert np.all(np.asarray(tiny["forward"](tiny["initial"], *args)) == 0)
  assert np.abs(np.asarray(tiny["forward"](tiny["state"], *args))).max() > 1e-3


def test_context_and_timestep_change_the_output(tiny):
  x, t, context = _inputs(TINY)
  forward, state = tiny["forward"], tiny["state"]
  y = forward(state, x, t, context)
  assert _differ(y, forward(state, x, t, context + 1.0))
  assert _differ(y, forward(state, x, t + 100, context))


def test_k_identical_tokens_equal_one_token(tiny):
  x, t, context = _inputs(TINY, tokens=1)
  forward, state = tiny["forward"], tiny["state"]
  np.testing.assert_allclose(forward(state, x, t, context),
                             forward(state, x, t, jnp.repeat(context, 4, axis=1)),
                             atol=1e-5, rtol=1e-5)


def test_deterministic_needs_no_rng_and_dropout_draws_from_rngs(tiny):
  graphdef, state = tiny["graphdef"], tiny["state"]

  @functools.partial(jax.jit, compiler_options=_JIT_OPTIONS)
  def dropped(state, x, t, context, seed):
    return nnx.merge(graphdef, state)(x, t, context, deterministic=False,
                                      rngs=nnx.Rngs(dropout=jax.random.key(seed)))

  args = _inputs(TINY)
  a = tiny["forward"](state, *args)
  np.testing.assert_array_equal(a, tiny["forward"](state, *args))
  b = dropped(state, *args, 7)
  np.testing.assert_array_equal(b, dropped(state, *args, 7))  # same key, same masks
  assert _differ(a, b)
  assert _differ(b, dropped(state, *args, 8))


def _check_names(state, names):
  params = dict(nnx.to_flat_state(state))
  axes = dict(nnx.to_flat_state(names))
  assert axes.keys() == params.keys()
  for path, param in params.items():
    assert len(axes[path]) == param.ndim, (path, axes[path], param.shape)
    assert set(axes[path]) <= set(unet.LOGICAL_AXES), (path, axes[path])
    # One mesh axis cannot shard two axes of one array.
    assert len(set(axes[path])) == len(axes[path]), (path, axes[path])


@pytest.mark.parametrize("config", [TINY, unet.OFFLINE_CONFIG, unet.PAPER_CONFIG],
                         ids=["tiny", "offline", "paper"])
def test_every_parameter_has_logical_names_of_its_rank(config):
  model = nnx.eval_shape(lambda: unet.UNet(config, unet.init_rngs(0)))
  state = nnx.state(model, nnx.Param)
  _check_names(state, unet.logical_axes(model))
  _check_names(state, unet.logical_axes(state))


def test_built_model_carries_the_names(tiny):
  _check_names(nnx.state(tiny["model"], nnx.Param), unet.logical_axes(tiny["model"]))


def _is_names(x):
  return isinstance(x, tuple)


def test_names_map_to_mesh_axes_with_a_rule_table():
  model = nnx.eval_shape(lambda: unet.UNet(TINY, unet.init_rngs(0)))
  # Megatron-style: heads and hidden units split over "tensor", channels over "fsdp".
  rules = {name: None for name in unet.LOGICAL_AXES} | {
      "channels": "fsdp", "heads": "tensor", "mlp": "tensor"}
  specs = jax.tree.map(lambda names: jax.P(*(rules[n] for n in names)), unet.logical_axes(model),
                       is_leaf=_is_names)
  assert specs["conv_in"]["kernel"] == jax.P(None, None, None, "fsdp")
  for _, spec in nnx.to_flat_state(specs):
    used = [axis for axis in spec if axis is not None]
    assert len(used) == len(set(used)), spec  # a valid NamedSharding spec
  # Flax reads the same names from the parameters' metadata.
  with nnx.logical_axis_rules(list(rules.items())):
    flax_specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
  for path, spec in nnx.to_flat_state(specs):
    assert flax_specs[path].get_value() == spec, path


def test_paper_config_has_about_400m_parameters():
  count = unet.param_count(unet.PAPER_CONFIG)
  assert abs(count - 400e6) / 400e6 < 0.05, count


def test_param_count_matches_a_built_model(tiny):
  built = sum(p.size for p in jax.tree.leaves(nnx.state(tiny["model"], nnx.Param)))
  assert unet.param_count(TINY) == built


def test_config_json_round_trip():
  assert unet.UNetConfig.from_json(unet.PAPER_CONFIG.to_json()) == unet.PAPER_CONFIG


@pytest.mark.parametrize("changes, message", [
    (dict(base_channels=10), "norm_groups"),
    (dict(norm_groups=3), "norm_groups"),
    (dict(head_channels=6), "head_channels"),
    (dict(attention_resolutions=(2,)), "not feature-map sizes"),
    (dict(resolution=6, channel_mult=(1, 2, 2), attention_resolutions=()), "halve"),
    (dict(resolution=16, patch_size=2, channel_mult=(1, 2, 2, 2, 2)), "halve"),
    (dict(patch_size=3), "patch_size"),
    (dict(patch_size=2, attention_resolutions=(8,)), "not feature-map sizes"),
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
  x, t, context = _inputs(TINY)
  with pytest.raises(ValueError, match="context"):
    tiny["model"](x, t, context[..., :4])
  with pytest.raises(ValueError, match="x must be"):
    tiny["model"](x[:, :4], t, context)
