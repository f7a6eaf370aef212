"""Where the default U-Net's training time goes on a CPU, against the same U-Net in torch.

benchmarks/unet.py measures whole training steps; this splits one step on one core into the
model's forward and backward, and each of those into the convolutions and the rest. Whole model:
the MSE loss through configs/default.py's U-Net at --batch examples, jitted (ours), and through
diffusers' matched U-Net (benchmarks/peers.py, on the same 2x2-folded 16x16x4 maps) in eager
torch; its backward is the forward + backward call less the forward call. The convolutions are
read off the model itself: its forward pass is traced, and every `conv_general_dilated` in it
(input shape, kernel shape, stride, padding) is one layer; layers of equal shape are grouped and
counted. Each shape is then timed two ways in each contender:

- forward: the convolution;
- backward: both gradients, for the input and for the kernel, from one output gradient, as a
  training step's backward pass computes them;

ours with `jax.lax.conv_general_dilated` and `jax.vjp`, each jitted on its own (XLA's CPU backend
and its YNNPACK kernels, float32, NHWC), the peer with `torch.nn.functional.conv2d` and
`torch.autograd.grad` for both (oneDNN, float32, NCHW; the forward that autograd needs is timed
with it and subtracted). The convolutions' forward and backward are summed over the layers,
weighted by their counts: what they cost in one training step at this batch (the first layer's
input gradient, which a step does not need, included); the rest is the whole model less them.

Each contender runs in its own process pinned to one core (`os.sched_setaffinity`; torch with one
thread), so the figures compare the kernels per core, as the `dprdm` command runs one JAX device
per core. Figures: median of --reps calls after 3 warm-up calls, in --rounds rounds (ratios within
a round, the median over rounds shown).

  python benchmarks/unet_profile.py   # from the repository root, with the bench extra installed
"""

import collections
import json
import os
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import machine_info  # benchmarks/machine_info.py, beside this script
from dprdm_jax import config_lib
from dprdm_jax import train
from dprdm_jax.models import unet

_BATCH = flags.DEFINE_integer("batch", 32, "Examples per call: the training batch of one device "
                              "(64 over 2 devices in benchmarks/unet.py).")
_REPS = flags.DEFINE_integer("reps", 15, "Timed calls per figure (median taken).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of both contenders, one after the other.")
_CONTENDER = flags.DEFINE_enum("contender", None, ["ours", "torch"],
                               "Measure one contender (default: both, each in a subprocess).")
_KINDS = ("forward", "backward")


def model_convolutions(batch: int) -> list[dict]:
  """The U-Net's convolutions at `batch` examples: [{input, kernel, stride, padding, count}]."""
  config = config_lib.load("configs/default.py")
  c = train.model_config(config)
  model = unet.UNet(c, unet.init_rngs(0))
  x = jnp.zeros((batch, c.resolution, c.resolution, c.in_channels))
  jaxpr = jax.make_jaxpr(lambda x, t, ctx: model(x, t, ctx))(
      x, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, 1, c.context_dim)))
  shapes = collections.Counter()
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      stride, padding = eqn.params["window_strides"], eqn.params["padding"]
      shapes[(lhs, rhs, tuple(stride), tuple(map(tuple, padding)))] += 1
  if not shapes:
    raise RuntimeError("no convolution found in the traced U-Net")
  return [dict(input=list(lhs), kernel=list(rhs), stride=list(stride),
               padding=[list(p) for p in padding], count=count)
          for (lhs, rhs, stride, padding), count in sorted(shapes.items())]


def _ours_model(batch: int) -> dict:
  """Seconds of the whole U-Net's forward, and forward + backward of an MSE loss, XLA."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  config = config_lib.load("configs/default.py")
  c = train.model_config(config)
  graphdef, params, rest = nnx.split(unet.UNet(c, unet.init_rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, c.resolution, c.resolution, c.in_channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch))
  context = jnp.asarray(rng.normal(size=(batch, 1, c.context_dim)), jnp.float32)

  def loss(params):
    return jnp.mean((nnx.merge(graphdef, params, rest)(x, t, context) - x) ** 2)

  forward, both = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
  return dict(forward=machine_info.median_seconds(
      lambda: jax.block_until_ready(forward(params)), _REPS.value, 3),
              backward=machine_info.median_seconds(
                  lambda: jax.block_until_ready(both(params)), _REPS.value, 3))


def _torch_model(batch: int) -> dict:
  """The same for diffusers' matched U-Net (benchmarks/peers.py) on the folded 16x16x4 maps."""
  import torch  # pylint: disable=g-import-not-at-top
  import peers  # pylint: disable=g-import-not-at-top
  config = config_lib.load("configs/default.py")
  c = train.model_config(config)
  net = peers.torch_unet(c)
  folded = c.resolution // c.patch_size
  x = torch.randn(batch, c.in_channels * c.patch_size**2, folded, folded)
  t = torch.randint(0, 1000, (batch,))
  context = torch.randn(batch, 1, c.context_dim)

  def forward():
    with torch.no_grad():
      net(x, t, context)

  def both():
    net.zero_grad()
    ((net(x, t, context).sample - x) ** 2).mean().backward()

  return dict(forward=machine_info.median_seconds(forward, _REPS.value, 3),
              backward=machine_info.median_seconds(both, _REPS.value, 3))


def _pin_to_one_core():
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})


def _ours(layers: list[dict]) -> list[dict]:
  """Seconds of forward and backward per layer shape, XLA on one core."""
  rng = np.random.default_rng(0)
  out = []
  for layer in layers:
    stride, padding = tuple(layer["stride"]), [tuple(p) for p in layer["padding"]]

    def conv(x, w, stride=stride, padding=padding):
      return jax.lax.conv_general_dilated(x, w, stride, padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jnp.asarray(rng.normal(size=layer["input"]), jnp.float32)
    w = jnp.asarray(rng.normal(size=layer["kernel"]) * 0.1, jnp.float32)
    g = jnp.asarray(rng.normal(size=jax.eval_shape(conv, x, w).shape), jnp.float32)
    calls = dict(forward=jax.jit(conv),
                 backward=jax.jit(lambda x, w, g, conv=conv: jax.vjp(conv, x, w)[1](g)))
    args = dict(forward=(x, w), backward=(x, w, g))
    out.append({kind: machine_info.median_seconds(
        lambda f=calls[kind], a=args[kind]: jax.block_until_ready(f(*a)), _REPS.value, 3)
                for kind in _KINDS})
  return out


def _torch(layers: list[dict]) -> list[dict]:
  """Seconds of forward and backward per layer shape, torch (oneDNN) with one thread."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  torch.manual_seed(0)
  out = []
  for layer in layers:
    b, h, w_, ci = layer["input"]
    kh, kw, _, co = layer["kernel"]
    # torch pads both sides alike; the traced paddings are symmetric for the U-Net's layers.
    if any(lo != hi for lo, hi in layer["padding"]):
      raise ValueError(f"asymmetric padding {layer['padding']} has no torch conv2d equivalent")
    padding = tuple(lo for lo, _ in layer["padding"])
    x = torch.randn(b, ci, h, w_, requires_grad=True)
    w = (torch.randn(co, ci, kh, kw) * 0.1).requires_grad_()
    conv = lambda x, w, s=tuple(layer["stride"]), p=padding: torch.nn.functional.conv2d(
        x, w, stride=s, padding=p)
    g = torch.randn_like(conv(x, w))

    def forward():
      with torch.no_grad():
        conv(x, w)

    def backward():
      torch.autograd.grad(conv(x, w), (x, w), g)

    t_forward = machine_info.median_seconds(forward, _REPS.value, 3)
    # Autograd needs the forward's graph: it runs with the backward and is subtracted.
    t_backward = machine_info.median_seconds(backward, _REPS.value, 3) - t_forward
    out.append(dict(forward=t_forward, backward=max(t_backward, 0.0)))
  return out


def _label(layer: dict) -> str:
  _, h, w, ci = layer["input"]
  kh, kw, _, co = layer["kernel"]
  stride = "/2" if layer["stride"] != [1, 1] else ""
  return f"{h}x{w} {kh}x{kw}{stride} {ci}->{co}"


def _step_seconds(layer_seconds: list[dict], layers: list[dict], kinds=_KINDS) -> float:
  """Seconds of `kinds` over every convolution of one step (each shape times its count)."""
  return sum(layer["count"] * seconds[kind] for seconds, layer in zip(layer_seconds, layers)
             for kind in kinds)


def main(argv):
  layers = model_convolutions(_BATCH.value)
  if _CONTENDER.value:
    _pin_to_one_core()
    ours = _CONTENDER.value == "ours"
    model = (_ours_model if ours else _torch_model)(_BATCH.value)
    # The model's "backward": the forward + backward call less the forward alone.
    model["backward"] = max(model["backward"] - model["forward"], 0.0)
    print(json.dumps(dict(layers=(_ours if ours else _torch)(layers), model=model)))
    return
  print(f"machine: {machine_info.cpu_model()}; the default U-Net's convolutions at batch "
        f"{_BATCH.value}, float32, each contender on one core")
  load_meter = machine_info.BackgroundLoad()
  load_meter.start()
  rounds, models = [], []
  for _ in range(_ROUNDS.value):
    contenders = machine_info.run_contenders(argv, ("ours", "torch"))
    rounds.append({name: result["layers"] for name, (_, result) in contenders.items()})
    models.append({name: result["model"] for name, (_, result) in contenders.items()})

  def median(name, i, kind):
    return statistics.median(r[name][i][kind] for r in rounds)

  header = (f"{'input HxW, kernel, Cin->Cout':<28} {'count':>5} " +
            " ".join(f"{k + ' ms':>16}" for k in _KINDS) + "  " +
            " ".join(f"{k + ' /torch':>10}" for k in _KINDS))
  print(header)
  print("-" * len(header))
  for i, layer in enumerate(layers):
    cells = " ".join(f"{median('ours', i, k) * 1e3:7.3f} / {median('torch', i, k) * 1e3:6.3f}"
                     for k in _KINDS)
    ratios = " ".join(
        f"{statistics.median(r['ours'][i][k] / r['torch'][i][k] for r in rounds):>10.2f}"
        for k in _KINDS)
    print(f"{_label(layer):<28} {layer['count']:>5} {cells}  {ratios}")
  print("cells: ours / torch milliseconds per call (median over rounds); /torch: time ratios, "
        "> 1 means ours is slower")
  print(f"\none training step at batch {_BATCH.value} on one core, ms (median over rounds; "
        "ours / torch time ratio within each round, > 1 means ours is slower):")
  print(f"{'':34} {'ours':>8} {'torch':>8} {'ours/torch':>10}")
  for kind in _KINDS:
    rows = (
        (f"whole U-Net, {kind}", [m["ours"][kind] for m in models],
         [m["torch"][kind] for m in models]),
        (f"  its convolutions, {kind}", [_step_seconds(r["ours"], layers, (kind,)) for r in rounds],
         [_step_seconds(r["torch"], layers, (kind,)) for r in rounds]),
        (f"  the rest, {kind}",
         [m["ours"][kind] - _step_seconds(r["ours"], layers, (kind,))
          for m, r in zip(models, rounds)],
         [m["torch"][kind] - _step_seconds(r["torch"], layers, (kind,))
          for m, r in zip(models, rounds)]))
    for label, ours, torch_ in rows:
      ratio = statistics.median(o / t for o, t in zip(ours, torch_))
      print(f"{label:34} {statistics.median(ours) * 1e3:8.1f} "
            f"{statistics.median(torch_) * 1e3:8.1f} {ratio:10.2f}")
  print("whole U-Net: the loss (MSE) through the model, jitted (ours) or eager (torch); backward ="
        " forward + backward call less the forward call; the rest = whole less the convolutions "
        "timed one by one")
  print(load_meter.summary())


if __name__ == "__main__":
  app.run(main)
