"""Training and sampling throughput of the default U-Net against the same U-Net in PyTorch.

What is measured, for the default config's model (configs/default.py: 32x32x1, context 384):

- training examples/s: ours is `dprdm_jax.train.Trainer.train_step` (jitted: Adapt context,
  epsilon-prediction loss, gradient clipping, AdamW, EMA) on one device; the peer is diffusers'
  `UNet2DConditionModel` with matched channels, blocks, attention and context size, float32 on the
  CPU with torch's default threads, doing forward, MSE loss to the noise, backward, clipping and
  AdamW. Ours folds each 2x2 pixel patch into channels (patch_size 2); the peer gets the same
  fold (pixel_unshuffle before, pixel_shuffle after), so both work on 16x16x4 maps with the same
  number of parameters.
- sampling images/s: 50 DDIM steps, guidance scale 1 (one model call per step). Ours is
  `dprdm_jax.diffusion.sampler.ddim_sample` jitted as one program; the peer is diffusers'
  `DDIMScheduler` loop calling the U-Net once per step under `torch.no_grad()`.

Ours runs twice: "ours" on JAX's one CPU device, and "ours-cores" with one CPU device per core
(XLA_FLAGS=--xla_force_host_platform_device_count=<cores>) and the batch split over them by the
data axis of the mesh, as `dprdm train` and `dprdm generate` do on any machine with several
devices. On one device the many small operations of a small U-Net leave the second core idle
(a profile showed 417 ms of CPU in a 370 ms step on two cores); one device per core keeps both
busy. Torch uses its default threads (one per core) either way.

Both models are printed with their parameter counts. Each figure is the median of --reps timed
calls after --warmup untimed ones (ours compiles during the warm-up), and all contenders run in
--rounds rounds: each ratio is taken within a round, and the median of the rounds is reported
with every round's figures. Each contender runs in its own process, one after the
other: in one process XLA's and torch's thread pools compete (diffusers' sampling measured 0.1
images/s beside a live JAX runtime, 0.77 in its own process, though under different background
loads).

  python benchmarks/unet.py            # from the repository root, with the bench extra installed
"""

import json
import statistics

from absl import app
from absl import flags
import jax
import numpy as np

import machine_info  # benchmarks/machine_info.py, beside this script
import peers  # benchmarks/peers.py
from dprdm_jax import config_lib
from dprdm_jax import sharding
from dprdm_jax import train
from dprdm_jax.diffusion import sampler
from dprdm_jax.models import unet

_BATCH = flags.DEFINE_integer("batch", 64, "Training batch size.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 64, "Images per sampling call.")
_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median taken).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed repetitions first.")
_CONTENDER = flags.DEFINE_enum("contender", None, ["ours", "ours-cores", "diffusers"],
                               "Measure one contender (default: all, each in a subprocess).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of all contenders, one after another; each "
                               "ratio is taken within a round and the median over rounds shown.")


def _ours(config, c, rng) -> tuple[float, float]:
  """(training examples/s, sampling images/s) of ours."""
  b, sb = _BATCH.value, _SAMPLE_BATCH.value
  trainer = train.Trainer(config, sharding.make_mesh({"data": -1}))  # every device the process has
  batch = dict(image=rng.uniform(-1, 1, (b, c.resolution, c.resolution, c.in_channels)).astype(
      np.float32), neighbors=rng.normal(size=(b, 4, c.context_dim)).astype(np.float32))
  batch = sharding.global_batch(batch, trainer.mesh)
  state = [trainer.init(0)]

  def step():
    state[0], metrics = trainer.train_step(state[0], batch)
    jax.block_until_ready(metrics)

  t_train = machine_info.median_seconds(step, _REPS.value, _WARMUP.value)
  params = state[0]["ema"]
  schedule = train.noise_schedule(config)
  shape = (sb, c.resolution, c.resolution, c.in_channels)

  rows = sharding.batch_sharding(trainer.mesh)

  @jax.jit
  def sample(params, key, context):
    model = trainer.model(params)
    return sampler.ddim_sample(lambda x, t, ctx: model(x, t, ctx), schedule, key, shape,
                               context, num_steps=_STEPS.value, sharding=rows)

  context = jax.device_put(rng.normal(size=(sb, 1, c.context_dim)).astype(np.float32), rows)
  t_sample = machine_info.median_seconds(
      lambda: jax.block_until_ready(sample(params, jax.random.key(1), context)),
      max(_REPS.value // 2, 1), 1)
  return b / t_train, sb / t_sample


def _diffusers(c) -> tuple[float, float]:
  """(training examples/s, sampling images/s) of the same U-Net in diffusers."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  b, sb = _BATCH.value, _SAMPLE_BATCH.value
  torch.manual_seed(0)
  net = peers.torch_unet(c)
  fold = lambda x: torch.nn.functional.pixel_unshuffle(x, c.patch_size)
  unfold = lambda x: torch.nn.functional.pixel_shuffle(x, c.patch_size)
  peer = lambda x, t, context: unfold(net(fold(x), t, context).sample)
  print(f"diffusers UNet2DConditionModel: {sum(p.numel() for p in net.parameters()):,} "
        f"parameters, torch {torch.__version__} with {torch.get_num_threads()} threads")
  optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
  x0 = torch.randn(b, c.in_channels, c.resolution, c.resolution)
  context = torch.randn(b, 1, c.context_dim)

  def step():
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (b,))
    loss = torch.nn.functional.mse_loss(peer(x0 + noise, t, context), noise)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()

  t_train = machine_info.median_seconds(step, _REPS.value, _WARMUP.value)
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                            beta_schedule="scaled_linear", clip_sample=False)
  sample_context = torch.randn(sb, 1, c.context_dim)

  def sample():
    scheduler.set_timesteps(_STEPS.value)
    x = torch.randn(sb, c.in_channels, c.resolution, c.resolution)
    with torch.no_grad():
      for t in scheduler.timesteps:
        x = scheduler.step(peer(x, t, sample_context), t, x).prev_sample

  t_sample = machine_info.median_seconds(sample, max(_REPS.value // 2, 1), 1)
  return b / t_train, sb / t_sample


def main(argv):
  config = config_lib.load("configs/default.py")
  c = train.model_config(config)
  if _CONTENDER.value in ("ours", "ours-cores"):
    print(f"{_CONTENDER.value}: {unet.param_count(c):,} parameters, {jax.device_count()} JAX "
          "CPU device(s), the batch split over them")
    print(json.dumps(_ours(config, c, np.random.default_rng(0))))
    return
  if _CONTENDER.value == "diffusers":
    print(json.dumps(_diffusers(c)))
    return
  print(f"machine: {machine_info.cpu_model()}; training batch {_BATCH.value}, sampling batch "
        f"{_SAMPLE_BATCH.value} with {_STEPS.value} DDIM steps")
  load_meter = machine_info.BackgroundLoad()
  load_meter.start()
  # This VM's speed drifts by up to 20% within minutes, for every contender alike: a ratio is
  # taken between contenders of one round, and the rounds show how far it moves.
  rounds = []
  for r in range(_ROUNDS.value):
    contenders = machine_info.run_contenders(
        argv, ("ours", "ours-cores", "diffusers"),
        {"ours-cores": machine_info.ONE_DEVICE_PER_CORE})
    if r == 0:
      for lines, _ in contenders.values():
        print("\n".join(lines))
    rounds.append({name: rate for name, (_, rate) in contenders.items()})
  for task, unit, column in (("training", "examples/s", 0), ("sampling", "images/s", 1)):
    for name in ("ours", "ours-cores"):
      ratios = [one[name][column] / one["diffusers"][column] for one in rounds]
      cells = ", ".join(f"{one[name][column]:,.1f} vs {one['diffusers'][column]:,.1f}"
                        for one in rounds)
      print(f"{task}: {name} / diffusers, median ratio {statistics.median(ratios):.2f}x (rounds "
            f"{', '.join(f'{x:.2f}x' for x in ratios)}; {unit}: {cells})")
  print(load_meter.summary())


if __name__ == "__main__":
  app.run(main)
