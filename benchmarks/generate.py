"""`dprdm generate` throughput against diffusers' DDIM on the matched U-Net, and where time goes.

What is measured, with the offline default's U-Net (--checkpoint: the shipped release by
default, or a `dprdm train` work directory) and the demo's stores (run `bash launch/local.sh demo`
first):

- ours: `dprdm_jax.generate.generate` in private mode on 64 class prompts (one batch of 64): the
  ledger charge, prompt encoding (MiniLM), then one compiled program (exact private retrieval over
  the 60,000 private records, the DP aggregation, 50 DDIM steps with classifier-free guidance
  from the EMA U-Net), and writing the PNGs and JSON records. Charged to a throw-away ledger.
- the share of that batch's time spent in retrieval plus aggregation: the same retrieval and
  aggregation, jitted alone, on the same table, prompts and keys.
- the peer: diffusers' `UNet2DConditionModel` with the same channels, blocks, attention and
  context size (benchmarks/peers.py, the matched model of benchmarks/unet.py, randomly
  initialised: speed does not depend on the weights), `DDIMScheduler` with the same schedule,
  50 steps, the same guidance scale and eta and x0 clipping, batch 64 (the conditional and
  unconditional halves in one call of 128), in torch under `no_grad`. It retrieves nothing and
  writes nothing, so the ratio flatters it.

Each contender runs in its own process; each figure is the median of --reps timed calls after
one untimed call (ours compiles in it). Ours runs three times: on JAX's one CPU device ("ours"),
on one CPU device per core ("ours-cores", as the `dprdm` command runs the jobs on a CPU; the batch
of 64 is split over them), and on one device per core with the retrieval on the host
("ours-host", --config.generate.retrieval=host: `HostRetriever`'s scan over the stores' files,
then aggregation and DDIM as one program; its retrieval share is that scan plus the jitted
aggregation).

  python benchmarks/generate.py          # from the repository root, with the bench extra installed
"""

import functools
import json
import pathlib
import tempfile

from absl import app
from absl import flags
import jax

import machine_info  # benchmarks/machine_info.py, beside this script
import peers  # benchmarks/peers.py
from dprdm_jax import config_lib
from dprdm_jax import train
from dprdm_jax.data import offline

_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions (median taken).")
_CONTENDER = flags.DEFINE_enum("contender", None, ["ours", "ours-cores", "ours-host", "diffusers"],
                               "Measure one contender (default: all, each in a subprocess).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "releases/offline-default",
                                  "The U-Net: a release or a `dprdm train` work directory.")
BATCH = 64


def _prompts() -> list[str]:
  captions = offline.class_captions("fashion_mnist")
  return [captions[i % len(captions)] for i in range(BATCH)]


def _ours(config) -> dict:
  from dprdm_jax import generate  # pylint: disable=g-import-not-at-top
  from dprdm_jax.privacy import aggregate  # pylint: disable=g-import-not-at-top
  from dprdm_jax.privacy import keys as keys_lib  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import device  # pylint: disable=g-import-not-at-top
  gen = generate.Generator(config)
  prompts = _prompts()
  work = pathlib.Path(tempfile.mkdtemp())
  calls = iter(range(1000))

  def batch():
    i = next(calls)
    generate.generate(config, prompts, work / f"out{i}", "private", str(work / "ledger.db"),
                      generator=gen, progress=False)

  t_batch = machine_info.median_seconds(batch, _REPS.value, 1)
  g, p = config.generate, config.privacy
  retrieval_set = generate.RetrievalSet(g.private_keys, g.private_values)
  table = retrieval_set.table(gen.mesh, g.retrieval)
  text, values = gen.embed_prompts(prompts)
  queries = gen.queries(text, values)
  subsample_keys = keys_lib.query_keys(1, 0, BATCH, keys_lib.Stream.SUBSAMPLE)
  noise_keys = keys_lib.query_keys(1, 0, BATCH, keys_lib.Stream.NOISE)
  aggregate_jit = jax.jit(functools.partial(aggregate.aggregate, noise_std=p.noise_std,
                                            interpolation=p.interpolation))

  @jax.jit
  def retrieve_and_aggregate(table, queries, values, subsample_keys, noise_keys):
    found = device.private_knn(table, queries, subsample_keys, p.sampling_rate, p.num_neighbors)
    return aggregate_jit(found.embeddings, found.valid, values, noise_keys)

  def on_host():
    found = table.retrieve(queries, subsample_keys, p.sampling_rate, p.num_neighbors)
    return jax.block_until_ready(aggregate_jit(found.embeddings, found.valid, values, noise_keys))

  t_retrieval = machine_info.median_seconds(
      on_host if g.retrieval == "host" else
      lambda: jax.block_until_ready(retrieve_and_aggregate(table, queries, values, subsample_keys,
                                                           noise_keys)), 5, 1)
  return dict(images_per_second=BATCH / t_batch, batch_seconds=t_batch,
              retrieval_aggregation_seconds=t_retrieval, share=t_retrieval / t_batch,
              devices=jax.device_count(), private_records=retrieval_set.size)


def _diffusers(config) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  c, d = train.model_config(config), config.diffusion
  torch.manual_seed(0)
  net = peers.torch_unet(c).eval()
  fold = lambda x: torch.nn.functional.pixel_unshuffle(x, c.patch_size)
  unfold = lambda x: torch.nn.functional.pixel_shuffle(x, c.patch_size)
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=d.beta_start, beta_end=d.beta_end,
                            beta_schedule="scaled_linear", clip_sample=True,
                            clip_sample_range=d.clip_x0, timestep_spacing="linspace")
  context = torch.cat([torch.randn(BATCH, 1, c.context_dim), torch.zeros(BATCH, 1, c.context_dim)])

  def sample():
    scheduler.set_timesteps(d.sample_steps)
    x = torch.randn(BATCH, c.in_channels, c.resolution, c.resolution)
    with torch.no_grad():
      for t in scheduler.timesteps:
        eps_c, eps_u = unfold(net(fold(torch.cat([x, x])), t, context).sample).chunk(2)
        eps = eps_u + d.guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta=d.eta).prev_sample

  t = machine_info.median_seconds(sample, _REPS.value, 1)
  return dict(images_per_second=BATCH / t, batch_seconds=t, threads=torch.get_num_threads(),
              torch=torch.__version__)


def main(argv):
  config = config_lib.load("configs/default.py",
                           f"--config.generate.checkpoint={_CHECKPOINT.value}",
                           *(["--config.generate.retrieval=host"]
                             if _CONTENDER.value == "ours-host" else []))
  if _CONTENDER.value:
    print(json.dumps((_diffusers if _CONTENDER.value == "diffusers" else _ours)(config)))
    return
  d = config.diffusion
  print(f"machine: {machine_info.cpu_model()}; batch {BATCH}, {d.sample_steps} DDIM steps, "
        f"guidance {d.guidance_scale}, eta {d.eta}, x0 clipped to {d.clip_x0}")
  load_meter = machine_info.BackgroundLoad()
  load_meter.start()
  rates = machine_info.run_contenders(argv, ("ours", "ours-cores", "ours-host", "diffusers"),
                                      {"ours-cores": machine_info.ONE_DEVICE_PER_CORE,
                                       "ours-host": machine_info.ONE_DEVICE_PER_CORE})
  peer = rates["diffusers"][1]
  print(f"diffusers DDIM on the matched U-Net (torch {peer['torch']}, {peer['threads']} threads): "
        f"{peer['images_per_second']:.2f} images/s")
  for name in ("ours", "ours-cores", "ours-host"):
    ours = rates[name][1]
    print(f"{name}: dprdm generate (private, charged, {ours['private_records']:,} private "
          f"records, {ours['devices']} JAX CPU device(s)): {ours['images_per_second']:.2f} "
          f"images/s ({ours['batch_seconds']:.1f} s a batch); ratio "
          f"{ours['images_per_second'] / peer['images_per_second']:.2f}x; retrieval + "
          f"aggregation {ours['retrieval_aggregation_seconds'] * 1e3:.1f} ms = "
          f"{100 * ours['share']:.2f}% of the batch (goal: under 5%)")
  print(load_meter.summary())


if __name__ == "__main__":
  app.run(main)
