"""Every accelerator check in one run, on whatever JAX backend is present, printed as one table.

  bash benchmarks/device_check.sh                # from the repository root (benchmarks/README.md)
  bash benchmarks/device_check.sh --tiny         # every size shrunk: minutes on a CPU

The checks, in this order, each in a process of its own (so that each starts with the whole
accelerator memory, and a check that overruns its time is killed without losing the others):

- unet: the paper's U-Net (configs/coco.py: unet.PAPER_CONFIG, 400,920,579 parameters, 64x64x3,
  context d = 512) training step as `dprdm train` compiles it (train.Trainer.train_step: the
  Adapt context, the epsilon loss, gradient clipping, AdamW, the EMA), data parallel over every
  device, computing in --unet_dtype with --unet_batch examples per device (halved until it fits
  in memory): steps/s and examples/s; the step's FLOPs as XLA counts them in the compiled
  per-device program (`jax.jit(...).lower(...).compile().cost_analysis()`); model FLOPs
  utilisation, those FLOPs per second over the device's peak dense bf16 FLOP/s
  (PEAK_BF16_TFLOPS; "n/a" on a device not in that table, such as a CPU).
- generate: the compiled batch of `dprdm generate` (generate.Generator's program: exact private
  retrieval over N = 113,287 records, COCO's private set, of d = 512 keys and values, the DP
  aggregation, 50 DDIM steps with classifier-free guidance) on the paper's U-Net in the config's
  dtype (float32), --generate_batch images: images/s. Weights, table and prompts are random: the
  speed does not depend on them. Charging the ledger, encoding prompts and writing PNGs are not
  timed (benchmarks/generate.py times them on the offline default).
- retrieval: `retrieval.device.sharded_private_knn`, the table sharded by rows over every device,
  at the paper's k = 16 and q = 0.01, d = 512 float32, B = 256 queries a call, over the largest
  N that fits: in 90% of the device memory by XLA's memory analysis of the compiled search, and
  in the time left, from a timed call on N/64: queries/s.

Each check may take its share of --budget_s (the time one leaves unused passes to the next);
inside it, after one warm-up call, timed calls go on (at most 10) while the time left holds three
more. Every figure is the median of the timed calls. A check that fails or runs out of time gets
a row that says so. The table is printed at the end and, with --out, written with every figure to
a JSON file (rewritten after each check).
"""

import datetime
import functools
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

CHECKS = ("unet", "generate", "retrieval")
SHARES = {"unet": 0.4, "generate": 0.35, "retrieval": 0.25}  # of the budget, in order
CONFIG = "configs/coco.py"

_TINY = flags.DEFINE_bool("tiny", False, "Shrink every size (configs/coco.py:tiny, small tables) "
                          "so that the run takes minutes on a CPU.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Wall-clock seconds for all checks together.")
_OUT = flags.DEFINE_string("out", None, "Also write the results to this JSON file.")
_UNET_BATCH = flags.DEFINE_integer("unet_batch", 64, "Training examples per device (tiny: 2).")
_UNET_DTYPE = flags.DEFINE_enum("unet_dtype", "bfloat16", ["bfloat16", "float32"],
                                "The U-Net's compute dtype in the training step.")
_GENERATE_BATCH = flags.DEFINE_integer("generate_batch", 64, "Images per generate batch (tiny: 8), "
                                       "rounded up to a multiple of the devices.")
_CHECK = flags.DEFINE_enum("check", None, CHECKS, "Run this one check here and print its result "
                           "as JSON (how the run calls each check's process).")
_SECONDS = flags.DEFINE_float("seconds", 60.0, "With --check: the seconds the check may take.")

# Peak dense (no sparsity) bf16 FLOP/s of one device, in TFLOP/s, from the vendors' data sheets,
# by a substring of jax's device_kind; the first match wins, so variants come before families.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
    ("H200", 989.4), ("A100", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str):
  """The device's peak dense bf16 TFLOP/s, or None when it is not in PEAK_BF16_TFLOPS."""
  return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def _median_seconds(fn, deadline: float, max_reps: int = 10) -> tuple[float, int]:
  """(median seconds of fn(), timed calls): one untimed call, then timed calls, at most max_reps,
  while the time left before `deadline` (time.monotonic()) holds at least three more."""
  fn()
  times = []
  while True:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    if len(times) >= max_reps or statistics.median(times) * 3 > deadline - time.monotonic():
      return statistics.median(times), len(times)


def _out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def _device_facts() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return dict(kind=jax.devices()[0].device_kind, count=jax.device_count(),
              backend=jax.default_backend(), jax=jax.__version__)


def _unet(tiny: bool, deadline: float) -> dict:
  """The paper's U-Net training step: steps/s, examples/s, FLOPs, MFU."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from dprdm_jax import config_lib
  from dprdm_jax import sharding
  from dprdm_jax import train
  config = config_lib.load(CONFIG + (":tiny" if tiny else ""),
                           f"--config.model.dtype={_UNET_DTYPE.value}")
  mesh = sharding.make_mesh(config.mesh)
  trainer = train.Trainer(config, mesh)
  c = trainer.model_config
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  per_device = 2 if tiny else _UNET_BATCH.value
  rng = np.random.default_rng(0)
  while True:
    batch_size = per_device * devices
    try:
      state = [trainer.init(0)]
      batch = sharding.global_batch(dict(
          image=rng.uniform(-1, 1, (batch_size, c.resolution, c.resolution, c.in_channels)).astype(
              np.float32),
          neighbors=rng.normal(size=(batch_size, config.train.num_neighbors, c.context_dim)).astype(
              np.float32)), mesh)
      start = time.perf_counter()
      compiled = trainer.train_step.lower(state[0], batch).compile()
      compile_seconds = time.perf_counter() - start

      def step():
        state[0], metrics = compiled(state[0], batch)
        jax.block_until_ready(metrics)

      seconds, reps = _median_seconds(step, deadline)
      break
    except jax.errors.JaxRuntimeError as e:
      if not _out_of_memory(e) or per_device == 1:
        raise
      per_device //= 2
      print(f"unet: out of memory, retrying with {per_device} examples per device",
            file=sys.stderr, flush=True)
      state = batch = compiled = None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))  # of one device's program
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind)
  achieved = flops / seconds / 1e12
  mfu = 100 * achieved / peak if peak and flops else "n/a"
  return dict(
      setting=(f"{'configs/coco.py:tiny' if tiny else 'the paper'}'s U-Net, "
               f"{trainer.num_params:,} parameters, {c.resolution}x{c.resolution}x"
               f"{c.in_channels}, compute {c.dtype}, params {c.param_dtype}; batch {batch_size} = "
               f"{per_device} x {devices} device(s); median of {reps} steps"),
      rows=[("train steps/s", 1 / seconds, "steps/s"),
            ("train examples/s", batch_size / seconds, "examples/s"),
            ("step FLOPs", flops / 1e12, "TFLOP per device per step (XLA cost analysis)"),
            ("achieved", achieved, "TFLOP/s per device"),
            ("MFU", mfu, f"% of peak bf16 {peak:g} TFLOP/s ({kind})" if peak else
             f"% of peak bf16 (no peak known for {kind})"),
            ("step compile", compile_seconds, "s")])


class _Programs:
  """generate.Generator's compiled programs on a U-Net of random weights: the Generator without
  its checkpoint, towers and stores, which the programs do not read."""

  def __init__(self, config, mesh, trainer):
    from dprdm_jax import generate  # pylint: disable=g-import-not-at-top
    self.config, self.mesh, self.trainer, self._programs = config, mesh, trainer, {}
    # pylint: disable-next=protected-access
    self.program = functools.partial(generate.Generator._program, self)


def _unit_rows(rng, n: int, d: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _generate(tiny: bool, deadline: float) -> dict:
  """One batch of `dprdm generate`'s compiled program: images/s."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dprdm_jax import config_lib
  from dprdm_jax import sharding
  from dprdm_jax import train
  from dprdm_jax.privacy import keys as keys_lib
  from dprdm_jax.retrieval import device
  config = config_lib.load(CONFIG + (":tiny" if tiny else ""))
  mesh = sharding.make_mesh(config.mesh)
  trainer = train.Trainer(config, mesh)
  params = trainer.init(0)["ema"]
  p, d = config.privacy, config.diffusion
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-(8 if tiny else _GENERATE_BATCH.value) // devices) * devices
  n = 1024 if tiny else p.dataset_size
  rng = np.random.default_rng(0)
  shards = mesh.shape["data"] > 1
  table = device.DeviceTable.from_arrays(
      _unit_rows(rng, n, p.embedding_dim), np.arange(n), mesh if shards else None,
      "data" if shards else None, values=_unit_rows(rng, n, p.embedding_dim))
  prompts = jnp.asarray(_unit_rows(rng, rows, p.embedding_dim))
  program = _Programs(config, mesh, trainer).program("retrieve", rows, p.sampling_rate,
                                                     p.num_neighbors)
  args = (params, table, prompts, prompts,
          keys_lib.query_keys(config.seed, 0, rows, keys_lib.Stream.SUBSAMPLE),
          keys_lib.query_keys(config.seed, 0, rows, keys_lib.Stream.NOISE),
          jnp.float32(p.noise_std), jnp.float32(p.interpolation), jax.random.key(0),
          jnp.float32(d.guidance_scale))
  start = time.perf_counter()
  jax.block_until_ready(program(*args))
  first = time.perf_counter() - start
  seconds, reps = _median_seconds(lambda: jax.block_until_ready(program(*args)), deadline)
  c = trainer.model_config
  return dict(
      setting=(f"{'configs/coco.py:tiny' if tiny else 'the paper'}'s U-Net ({c.dtype}, "
               f"{trainer.num_params:,} parameters) with random weights; exact private retrieval "
               f"over N = {n:,} records of d = {p.embedding_dim} (k = {p.num_neighbors}, "
               f"q = {p.sampling_rate:g}), aggregation, {d.sample_steps} DDIM steps with guidance "
               f"{d.guidance_scale:g}; batch {rows} on {devices} device(s); median of {reps}"),
      rows=[("generate images/s", rows / seconds, "images/s"),
            ("generate batch", seconds, f"s per batch of {rows}"),
            ("generate first batch", first, "s (compilation included)")])


def memory_limit():
  """Bytes of the smallest device memory pool JAX may use, or None where JAX does not say (CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = [dev.memory_stats() for dev in jax.devices()]
  if all(s and "bytes_limit" in s for s in stats):
    return min(s["bytes_limit"] for s in stats)
  return None


def retrieval(deadline: float, d: int, k: int, q: float, b: int, step: int, limit,
              n=None) -> dict:
  """Sharded private k-NN over every device: queries/s over a table of n rows, or (n None) of the
  largest that fits in 90% of `limit` bytes per device by XLA's memory analysis and leaves time
  for the warm-up and 3 calls before `deadline`, from a timed call on n/64. Rows per device are
  a multiple of `step`; an out-of-memory error halves n."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from dprdm_jax import sharding
  from dprdm_jax.privacy import keys as keys_lib
  from dprdm_jax.retrieval import device
  mesh = sharding.make_mesh({"data": -1})
  shards = mesh.shape["data"]
  search = device.sharded_private_knn(mesh, "data", q, k)
  matrix, by_row = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data"))
  queries = jnp.asarray(_unit_rows(np.random.default_rng(0), b, d))
  keys = keys_lib.query_keys(1, 0, b, keys_lib.Stream.SUBSAMPLE)

  def abstract(n):
    return device.DeviceTable(jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=matrix),
                              jax.ShapeDtypeStruct((n,), jnp.uint32, sharding=by_row),
                              jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=by_row))

  @functools.partial(jax.jit, static_argnums=0, out_shardings=(matrix, by_row, by_row))
  def make(n):
    # Pseudo-random unit rows made on the device (no host copy of a table of many GiB).
    i = jax.lax.broadcasted_iota(jnp.float32, (n, d), 0)
    j = jax.lax.broadcasted_iota(jnp.float32, (n, d), 1)
    x = jnp.sin(i * 0.6180339 + j * 1.3247 + i * j * 1e-3)
    return (x / jnp.linalg.norm(x, axis=1, keepdims=True), jnp.arange(n, dtype=jnp.uint32),
            jnp.ones((n,), jnp.bool_))

  def rounded(n):
    return max(step, int(n) // (step * shards) * step) * shards

  def call(n):
    table = device.DeviceTable(*make(n))
    return table, lambda: jax.block_until_ready(search(table, queries, keys))

  bound = "given size"
  if n is None:
    per_row = 4 * d + 5 + 12 * b  # table row, id, present; (B,) scores, masked scores, mask
    n, bound = rounded(0.8 * limit / per_row * shards), "memory"
    while True:
      m = search.lower(abstract(n), queries, keys).compile().memory_analysis()
      need = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
      if need <= 0.9 * limit or n == rounded(n * 0.8):
        break
      n = rounded(n * 0.8)
    small = rounded(n / 64)
    _, run = call(small)
    run()
    start = time.perf_counter()
    run()
    guess = (time.perf_counter() - start) * n / small
    left = deadline - time.monotonic()
    if 5 * guess > left / 2:
      n, bound = rounded(n * left / 2 / (5 * guess)), "time"
  while True:
    try:
      table, run = call(n)
      seconds, reps = _median_seconds(run, deadline)
      break
    except jax.errors.JaxRuntimeError as e:
      if not _out_of_memory(e) or n <= step * shards:
        raise
      n, bound = rounded(n / 2), "memory"
      print(f"retrieval: out of memory, retrying with N = {n:,}", file=sys.stderr, flush=True)
  table_gib = math.prod(table.embeddings.shape) * 4 / shards / 2**30
  return dict(
      setting=(f"sharded_private_knn over {shards} device(s), N = {n:,} float32 rows of d = {d} "
               f"(bound: {bound}), k = {k}, q = {q:g}, B = {b}; median of {reps}"),
      bound=bound,
      rows=[("retrieval records N", n, f"records ({table_gib:.3g} GiB of table per device; "
                                       f"bound: {bound})"),
            ("retrieval queries/s", b / seconds, f"queries/s (B = {b}, k = {k}, q = {q:g})"),
            ("retrieval batch", seconds * 1e3, f"ms per batch of {b}")])


def _retrieval(tiny: bool, deadline: float) -> dict:
  """The paper's retrieval settings (tiny: d = 16, B = 16, 4,096 rows a device) over the largest
  table that fits (a million rows where JAX reports no memory size, as on a CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  if tiny:
    return retrieval(deadline, d=16, k=16, q=0.01, b=16, step=2**10, limit=None,
                     n=2**12 * jax.device_count())
  limit = memory_limit()
  return retrieval(deadline, d=512, k=16, q=0.01, b=256, step=2**16, limit=limit,
                   n=None if limit else 2**20)


def _run_check(name: str, seconds: float) -> dict:
  """Runs one check in a child process, killed after `seconds` (it plans for 10 s less); its
  result, or a failure."""
  argv = [sys.executable, __file__, f"--check={name}", f"--seconds={seconds - 10:.0f}",
          f"--tiny={_TINY.value}", f"--unet_batch={_UNET_BATCH.value}",
          f"--unet_dtype={_UNET_DTYPE.value}", f"--generate_batch={_GENERATE_BATCH.value}"]
  print(f"== {name}: up to {seconds:.0f} s", file=sys.stderr, flush=True)
  try:
    run = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=seconds, check=False)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {seconds:.0f} s (killed)")
  lines = run.stdout.strip().splitlines()
  try:
    return json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    return dict(error=f"its process ended with status {run.returncode} and no result")


def _format(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def table(results: dict, tiny: bool) -> str:
  """The results of the checks as one table: check, figure, value, unit; then each setting."""
  facts = next((r["device"] for r in results.values() if "device" in r), None)
  where = (f"{facts['count']} x {facts['kind']} ({facts['backend']}), jax {facts['jax']}"
           if facts else "no check reported its device")
  lines = [f"device check (benchmarks/device_check.py{' --tiny' if tiny else ''}), "
           f"{datetime.datetime.now().isoformat(timespec='seconds')}: {where}",
           f"{'check':<10} {'figure':<22} {'value':>12}  unit", "-" * 100]
  for name, result in results.items():
    if "error" in result:
      lines.append(f"{name:<10} {'(none)':<22} {'failed':>12}  {result['error']}")
    for figure, value, unit in result.get("rows", []):
      lines.append(f"{name:<10} {figure:<22} {_format(value):>12}  {unit}")
  lines.append("settings:")
  lines += [f"  {name}: {r['setting']}" for name, r in results.items() if "setting" in r]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CHECK.value:
    deadline = time.monotonic() + _SECONDS.value
    check = {"unet": _unet, "generate": _generate, "retrieval": _retrieval}[_CHECK.value]
    try:
      result = dict(check(_TINY.value, deadline), device=_device_facts())
    except Exception as e:  # pylint: disable=broad-except
      # The parent reports any failure as the check's row; the traceback goes to stderr.
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      message = (str(e).strip().splitlines() or [""])[0][:200]
      result = dict(error=f"{type(e).__name__}: {message}")
    print(json.dumps(result))
    return
  start = time.monotonic()
  results = {}
  for i, name in enumerate(CHECKS):
    left = _BUDGET.value - (time.monotonic() - start)
    seconds = left * SHARES[name] / sum(SHARES[n] for n in CHECKS[i:])
    results[name] = (_run_check(name, seconds) if seconds >= 20 else
                     dict(error=f"skipped: {seconds:.0f} s of the budget left"))
    if _OUT.value:
      pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1) + "\n")
  print(table(results, _TINY.value))


if __name__ == "__main__":
  app.run(main)
