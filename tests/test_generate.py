"""`dprdm generate` on the tiny config with the real pieces: MiniLM, the linear tower fitted by
train-encoder, stores of real Fashion-MNIST and public records, an 8-step U-Net trained by
`dprdm train`, dp-accounting and the SQLite ledger.

Every mode writes its PNGs and JSON records; only "private" is charged, and the ledger holds
exactly its queries; an exhausted budget refuses a batch before any private row is read; a
sharded run (8 fake devices) draws what one device draws; bad prompts are refused with nothing
charged. All but the prompt checks are slow (they train the tiny towers and U-Net once).
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dprdm_jax import cli
from dprdm_jax import errors
from dprdm_jax import generate
from dprdm_jax import sharding
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import keys as keys_lib
from dprdm_jax.privacy import ledger as ledger_lib
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import host
from dprdm_jax.retrieval import store as store_lib
from tests import conftest
from tests.test_configs import load

PROMPTS = ["a photo of a sneaker", "a photo of a bag", "a silhouette of a zebra"]
PRIVATE_RECORDS = conftest.TINY_PRIVATE_RECORDS


@pytest.fixture(scope="module")
def setup(tiny_product):
  """(root, config overrides) of the tiny towers, stores and U-Net (tests/conftest.py)."""
  return tiny_product


def _config(setup, *extra):
  return load("configs/default.py:tiny", *setup[1], *extra)


@pytest.fixture(scope="module")
def generator(setup):
  return generate.Generator(_config(setup))


def _grant_for_three(setup, tmp_path):
  """(config, the private retrieval set, a grant of 3 queries at sigma 0.5, q 0.5, k 4)."""
  config = _config(setup)
  g = config.generate
  retrieval_set = generate.RetrievalSet(g.private_keys, g.private_values)
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as book:
    book.register(retrieval_set.fingerprint, 10.0, 1e-3)
    grant = book.charge(retrieval_set.fingerprint, accounting.Mechanism(0.5, 0.5, 4), 3)
  return config, retrieval_set, grant


def _records(out):
  lines = (pathlib.Path(out) / "records.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("mode", generate.MODES)
def test_every_mode_writes_images_and_records_and_only_private_is_charged(setup, generator, mode,
                                                                          tmp_path):
  config, ledger = _config(setup), tmp_path / "ledger.db"
  b = generator.batch_size  # the tiny batch size 4, rounded up to the 8 devices
  prompts = (PROMPTS * b)[:b + 1]  # two batches, the second of one prompt (padded)
  n = len(prompts)
  summary = generate.generate(config, prompts, tmp_path / mode, mode, str(ledger),
                              allow_nonprivate=True, generator=generator, progress=False)
  assert summary["generated_now"] == n
  records = _records(tmp_path / mode)
  assert [r["prompt"] for r in records] == prompts
  for i, r in enumerate(records):
    image = np.asarray(Image.open(tmp_path / mode / r["image"]))
    assert image.shape == (32, 32) and image.dtype == np.uint8 and image.std() > 0
    assert json.loads((tmp_path / mode / f"{i:05d}.json").read_text()) == r
    for field in ("mode", "k", "q", "sigma", "interpolation", "guidance_scale", "eta",
                  "sample_steps", "seed", "query", "checkpoint_step"):
      assert field in r
    assert r["mode"] == mode and r["guidance_scale"] == config.diffusion.guidance_scale
  grid = np.asarray(Image.open(tmp_path / mode / "grid.png"))  # 3 prompts, up to 8 images each
  columns = min(generate.GRID_COLUMNS, prompts.count(PROMPTS[0]))
  assert grid.shape == (3 * 66 + 2, columns * 66 + 2)
  if mode == "private":
    assert [r["query"] for r in records] == list(range(n))
    assert all(r["delta"] == 1 / PRIVATE_RECORDS and r["accountant"] == "pld" for r in records)
    with ledger_lib.Ledger(ledger) as book:
      (status,) = book.status()
      assert status.queries == n
      assert [(first, c) for _, first, c in book.charges(status.budget.fingerprint)] == [
          (0, b), (b, 1)]
      m = accounting.Mechanism(config.privacy.noise_std, config.privacy.sampling_rate,
                               config.privacy.num_neighbors)
      assert records[-1]["epsilon_spent"] == pytest.approx(
          accounting.history_epsilon({m: n}, 1 / PRIVATE_RECORDS, "pld"))
      assert records[0]["epsilon_spent"] < records[-1]["epsilon_spent"]
    assert oct(ledger.stat().st_mode & 0o777) == oct(0o600)
  else:
    assert not ledger.exists()
    assert all(r["query"] is None for r in records)
    assert records[0]["epsilon"] == ("inf" if mode == "nonprivate" else 0.0)


@pytest.mark.slow
def test_a_rerun_skips_what_was_written_and_charges_nothing_more(setup, generator, tmp_path):
  config, ledger = _config(setup), str(tmp_path / "ledger.db")
  generate.generate(config, PROMPTS, tmp_path / "out", "private", ledger, generator=generator,
                    progress=False)
  again = generate.generate(config, PROMPTS, tmp_path / "out", "private", ledger,
                            generator=generator, progress=False)
  assert again["generated_now"] == 0
  with ledger_lib.Ledger(ledger) as book:
    assert book.status()[0].queries == 3
  assert again["queries_charged"] == 3 and again["epsilon_spent"] > 0
  # Another run's directory is refused before anything is charged.
  for prompts, mode in ((PROMPTS[::-1], "private"), (PROMPTS, "public")):
    with pytest.raises(generate.GenerateError, match="another run"):
      generate.generate(config, prompts, tmp_path / "out", mode, ledger, generator=generator,
                        progress=False)
  with ledger_lib.Ledger(ledger) as book:
    assert book.status()[0].queries == 3
  # While another process writes to an OUT, a run into it is refused before anything is charged;
  # once that process is gone (killed here), its lock is gone with it.
  (tmp_path / "busy").mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
      "print('locked', flush=True); sys.stdin.read()"), str(tmp_path / "busy" / ".lock")],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(generate.GenerateError, match="another `generate` is writing to"):
      generate.generate(config, PROMPTS, tmp_path / "busy", "private", ledger,
                        generator=generator, progress=False)
    with ledger_lib.Ledger(ledger) as book:
      assert book.status()[0].queries == 3
  finally:
    holder.kill()
    holder.wait()
  assert generate.generate(config, PROMPTS, tmp_path / "busy", "public", ledger,
                           generator=generator, progress=False)["generated_now"] == 3


@pytest.mark.slow
def test_one_generator_serves_other_guidance_lambda_and_k_and_records_what_it_drew(
    setup, generator, tmp_path):
  # The reused generator (built for w = 4, lambda = 1, k = 4) must draw what a generator built
  # for the new settings draws: they are arguments of its programs, not baked into them.
  extra = ("--config.diffusion.guidance_scale=1.5", "--config.privacy.interpolation=0.5",
           "--config.privacy.num_neighbors=2")
  config = _config(setup, *extra)
  reused = generate.generate(config, PROMPTS, tmp_path / "reused", "public", generator=generator,
                             progress=False)
  fresh = generate.generate(config, PROMPTS, tmp_path / "fresh", "public", progress=False)
  default = generate.generate(_config(setup), PROMPTS, tmp_path / "default", "public",
                              generator=generator, progress=False)
  images = {name: [np.asarray(Image.open(tmp_path / name / r["image"])) for r in
                   _records(tmp_path / name)] for name in ("reused", "fresh", "default")}
  np.testing.assert_array_equal(images["reused"], images["fresh"])
  assert not np.array_equal(images["reused"], images["default"])
  record = _records(tmp_path / "reused")[0]
  assert (record["guidance_scale"], record["interpolation"], record["k"]) == (1.5, 0.5, 2)
  assert reused["generated_now"] == fresh["generated_now"] == default["generated_now"] == 3
  # What the programs do not take as arguments must match the generator's config.
  for override, name in (("--config.diffusion.eta=0.0", "diffusion"),
                         ("--config.seed=7", "seed"),
                         ("--config.train.workdir=/elsewhere", "checkpoint")):
    with pytest.raises(generate.GenerateError, match=f"another config \\({name}"):
      generate.generate(_config(setup, override), PROMPTS, tmp_path / name, "public",
                        generator=generator, progress=False)


@pytest.mark.slow
def test_nonprivate_mode_must_be_asked_for(setup, generator, tmp_path):
  with pytest.raises(generate.GenerateError, match="explicitly"):
    generate.generate(_config(setup), PROMPTS, tmp_path / "out", "nonprivate",
                      str(tmp_path / "l.db"), generator=generator, progress=False)
  assert not (tmp_path / "out").exists() and not (tmp_path / "l.db").exists()


@pytest.mark.slow
def test_an_exhausted_budget_refuses_before_any_private_row_is_read(setup, generator, tmp_path,
                                                                    monkeypatch):
  # A budget of exactly one batch: the second batch is refused, and the private stores' rows are
  # read only after the first charge.
  config, b = _config(setup), generator.batch_size
  m = accounting.Mechanism(config.privacy.noise_std, config.privacy.sampling_rate,
                           config.privacy.num_neighbors)
  budget = accounting.history_epsilon({m: b}, 1 / PRIVATE_RECORDS, "pld") * 1.0001
  config = _config(setup, f"--config.privacy.epsilon_budget={budget}")
  ledger = str(tmp_path / "l.db")
  reads = []
  real = store_lib.EmbeddingStore.embeddings

  def counted(self):
    reads.append(self.directory)
    return real.fget(self)

  monkeypatch.setattr(store_lib.EmbeddingStore, "embeddings", property(counted))
  with pytest.raises(ledger_lib.BudgetExceededError, match="remaining epsilon"):
    generate.generate(config, (PROMPTS * b)[:b + 2], tmp_path / "out", "private", ledger,
                      generator=generator, progress=False)
  assert len(list((tmp_path / "out").glob("*.png"))) == b  # the first batch, whole
  assert reads  # the first batch did read the private rows

  def refuse(self):
    raise AssertionError(f"private rows of {self.directory} were read")

  monkeypatch.setattr(store_lib.EmbeddingStore, "embeddings", property(refuse))
  with pytest.raises(ledger_lib.BudgetExceededError, match="spent epsilon"):
    generate.generate(config, PROMPTS, tmp_path / "more", "private", ledger,
                      generator=generator, progress=False)
  assert not list((tmp_path / "more").glob("*.png"))
  with ledger_lib.Ledger(ledger) as book:
    assert book.status()[0].queries == b


@pytest.mark.slow
def test_a_grant_for_another_dataset_or_size_is_refused(setup, generator, tmp_path):
  config = _config(setup)
  g = config.generate
  retrieval_set = generate.RetrievalSet(g.private_keys, g.private_values)
  m = accounting.Mechanism(0.5, 0.5, 4)
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as book:
    book.register("another", 10.0, 1e-3)
    book.register(retrieval_set.fingerprint, 10.0, 1e-3)
    other = book.charge("another", m, 3)
    short = book.charge(retrieval_set.fingerprint, m, 2)
  table = retrieval_set.table(generator.mesh)
  with pytest.raises(generate.GenerateError, match="not for the retrieval set"):
    generator.generate_private(other, retrieval_set, table, PROMPTS, jax.random.key(0))
  with pytest.raises(generate.GenerateError, match="covers 2 queries"):
    generator.generate_private(short, retrieval_set, table, PROMPTS, jax.random.key(0))


@pytest.mark.slow
def test_private_images_use_the_grant_keys_and_sharded_equals_one_device(setup, generator,
                                                                        tmp_path):
  config = _config(setup)
  g = config.generate
  retrieval_set = generate.RetrievalSet(g.private_keys, g.private_values)
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as book:
    book.register(retrieval_set.fingerprint, 10.0, 1e-3)
    m = accounting.Mechanism(0.5, 0.5, 4)  # z = 1: a real subsample and real noise
    grants = [book.charge(retrieval_set.fingerprint, m, 3) for _ in range(2)]
  one = generate.Generator(config, sharding.make_mesh({}, jax.devices()[:1]))
  # A run of fewer prompts than config.generate.batch_size (4) computes only what it needs.
  assert [one.run_batch_size(n) for n in (1, 3, 4, 100)] == [1, 3, 4, 4]
  assert [generator.run_batch_size(n) for n in (1, 9)] == [8, 8]  # a multiple of 8 devices
  assert generator.mesh.size == 8 and generator.mesh.shape["data"] == 8
  key = jax.random.key(5)
  sharded = generator.generate_private(grants[0], retrieval_set,
                                       retrieval_set.table(generator.mesh), PROMPTS, key)
  single = one.generate_private(grants[0], retrieval_set, retrieval_set.table(one.mesh), PROMPTS,
                                key)
  assert np.abs(sharded.astype(int) - single.astype(int)).max() <= 1  # rounding at most
  other = one.generate_private(grants[1], retrieval_set, retrieval_set.table(one.mesh), PROMPTS,
                               key)
  assert not np.array_equal(other, single)  # fresh subsample and noise keys, same x_T
  assert not np.array_equal(grants[0].keys(keys_lib.Stream.NOISE),
                            grants[1].keys(keys_lib.Stream.NOISE))


@pytest.mark.slow
def test_host_retrieval_draws_what_the_device_program_draws(setup, tmp_path):
  """config.generate.retrieval = "host": the same neighbours as the device program for the same
  grant (so the same images, up to rounding), on one device and sharded over 8."""
  config, retrieval_set, grant = _grant_for_three(setup, tmp_path)
  on_host = retrieval_set.table(None, "host")
  assert isinstance(on_host, host.HostRetriever)
  one = generate.Generator(config, sharding.make_mesh({}, jax.devices()[:1]))
  on_device = retrieval_set.table(one.mesh)
  text, values = one.embed_prompts(PROMPTS)
  queries = one.queries(text, values)
  subsample_keys = grant.keys(keys_lib.Stream.SUBSAMPLE)
  found = on_host.retrieve(queries, subsample_keys, 0.5, 4)
  expected = jax.tree.map(np.asarray, device.private_knn(on_device, queries, subsample_keys,
                                                         0.5, 4))
  np.testing.assert_array_equal(found.ids, expected.ids)
  np.testing.assert_array_equal(found.valid, expected.valid)
  np.testing.assert_array_equal(found.embeddings, expected.embeddings)  # the values' rows
  assert found.valid.all() and found.embeddings.shape == (3, 4, values.shape[1])
  key = jax.random.key(5)
  device_images = one.generate_private(grant, retrieval_set, on_device, PROMPTS, key)
  host_images = one.generate_private(grant, retrieval_set, on_host, PROMPTS, key)
  assert np.abs(device_images.astype(int) - host_images.astype(int)).max() <= 1
  sharded = generate.Generator(config)  # 8 devices: the neighbours go to the batch's shards
  host_sharded = sharded.generate_private(grant, retrieval_set, on_host, PROMPTS, key)
  assert np.abs(host_sharded.astype(int) - host_images.astype(int)).max() <= 1


@pytest.mark.slow
def test_generate_on_the_host_route_charges_first_and_refuses_before_reading_rows(
    setup, generator, tmp_path, monkeypatch):
  b = generator.batch_size
  m = accounting.Mechanism(*(_config(setup).privacy[f] for f in ("noise_std", "sampling_rate",
                                                                 "num_neighbors")))
  budget = accounting.history_epsilon({m: b}, 1 / PRIVATE_RECORDS, "pld") * 1.0001
  config = _config(setup, "--config.generate.retrieval=host",
                   f"--config.privacy.epsilon_budget={budget}")
  ledger = str(tmp_path / "l.db")
  opened = []
  real = generate.RetrievalSet.table

  def counted(self, mesh, where="device"):
    opened.append(where)
    return real(self, mesh, where)

  monkeypatch.setattr(generate.RetrievalSet, "table", counted)
  summary = generate.generate(config, PROMPTS[:2], tmp_path / "out", "private", ledger,
                              generator=generator, progress=False)
  assert summary["generated_now"] == 2 and opened == ["host"]
  assert [r["query"] for r in _records(tmp_path / "out")] == [0, 1]
  for r in _records(tmp_path / "out"):
    assert np.asarray(Image.open(tmp_path / "out" / r["image"])).std() > 0

  def refuse(*args, **kwargs):
    raise AssertionError("the private stores were opened")

  monkeypatch.setattr(generate.RetrievalSet, "table", refuse)
  monkeypatch.setattr(store_lib.EmbeddingStore, "take", refuse)
  with pytest.raises(ledger_lib.BudgetExceededError, match="remaining epsilon"):
    generate.generate(config, PROMPTS * b, tmp_path / "more", "private", ledger,
                      generator=generator, progress=False)
  with ledger_lib.Ledger(ledger) as book:
    assert book.status()[0].queries == 2
  bad = _config(setup, "--config.generate.retrieval=gpu")
  with pytest.raises(generate.GenerateError, match="must be one of device, host"):
    generate.generate(bad, PROMPTS, tmp_path / "bad", "private", str(tmp_path / "bad.db"),
                      generator=generator, progress=False)
  assert not (tmp_path / "bad.db").exists()


@pytest.mark.slow
def test_a_private_batch_is_one_program_that_never_touches_the_host(setup, generator, tmp_path):
  """Retrieval over the sharded table, the DP aggregation and every guided DDIM step of a batch
  run as one compiled program: with its inputs on device, it runs under a transfer guard that
  refuses any host-to-device or device-to-host transfer, and its compiled code holds no call back
  into Python (which a guard would not see)."""
  config, retrieval_set, grant = _grant_for_three(setup, tmp_path)
  rows = generator.run_batch_size(3)
  program = generator._program("retrieve", rows, 0.5, 4)  # pylint: disable=protected-access
  text, values = generator.embed_prompts(PROMPTS)
  pad = lambda a: jnp.concatenate([jnp.asarray(a), jnp.repeat(jnp.asarray(a)[:1], rows - 3, 0)])
  args = jax.device_put((generator.params, retrieval_set.table(generator.mesh),
                         pad(generator.queries(text, values)), pad(values),
                         pad(grant.keys(keys_lib.Stream.SUBSAMPLE)),
                         pad(grant.keys(keys_lib.Stream.NOISE)), jnp.float32(0.5),
                         jnp.float32(config.privacy.interpolation), jax.random.key(3),
                         jnp.float32(config.diffusion.guidance_scale)))
  expected = np.asarray(program(*args))  # compiles outside the guard
  with jax.transfer_guard_host_to_device("disallow"), \
      jax.transfer_guard_device_to_host("disallow"):
    images = program(*args)
    images.block_until_ready()
  np.testing.assert_array_equal(np.asarray(images), expected)
  compiled = program.lower(*args).compile().as_text()
  assert "callback" not in compiled.lower()
  assert "while" in compiled  # the DDIM steps: a loop inside the program, not dispatches


@pytest.mark.slow
@pytest.mark.parametrize("override, error", [
    # The sampler refused these only after the batch's query had been charged.
    ("diffusion.sample_steps=0", "num_steps must lie in"),
    ("diffusion.eta=2.0", "eta must lie in"),
    ("privacy.interpolation=2.0", "lambda"),
    ("diffusion.guidance_scale=inf", "must be finite"),
    ("generate.batch_size=0", "batch_size must be >= 1"),
    ("privacy.num_neighbors=100000000", "num_neighbors"),
])
def test_a_setting_the_run_would_fail_on_is_refused_before_the_charge(setup, generator, tmp_path,
                                                                      override, error):
  config = _config(setup, f"--config.{override}")
  # A changed sampler needs a generator of its own (the shared one would refuse the config).
  own = None if override.startswith("diffusion.") and "guidance" not in override else generator
  with pytest.raises(errors.InputError, match=error):
    generate.generate(config, PROMPTS, tmp_path / "out", "private", str(tmp_path / "l.db"),
                      generator=own, progress=False)
  assert not (tmp_path / "l.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("prompt, error", [
    ("", "prompt 0 is empty"), ("   ", "prompt 0 is empty"),
    ("word " * 300, "tokens; the text tower takes at most 256")])
def test_bad_prompts_are_refused_with_nothing_charged(setup, generator, tmp_path, prompt, error):
  with pytest.raises(generate.GenerateError, match=error):
    generate.generate(_config(setup), [prompt], tmp_path / "out", "private",
                      str(tmp_path / "l.db"), generator=generator, progress=False)
  assert not (tmp_path / "l.db").exists()


@pytest.mark.slow
def test_cli_generates_and_refuses_bad_input_in_one_line(setup, tmp_path, capsys):
  args = ["dprdm", "generate", "--config=configs/default.py:tiny", *setup[1],
          f"--ledger={tmp_path / 'l.db'}"]
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"a photo of a bag\n\xff\xfe\n")
  junk = tmp_path / "junk" / "00000.json"  # an --out holding a file that is no record of ours
  junk.parent.mkdir()
  junk.write_text("garbage")
  for extra, message in (([f"--prompts={bad}"], "not UTF-8"),
                         ([], "exactly one of --prompt"),
                         (["--prompt=x", "--mode=nonprivate"], "explicitly"),
                         (["--prompt=x", "--repeat=0"], "--repeat must be"),
                         # refused before a billion-entry prompt list is built (it was killed
                         # for memory after 5 minutes)
                         (["--prompt=x", "--repeat=1000000000"], "at most 1,000,000"),
                         (["--prompt=x", f"--out={bad}"], "cannot create the directory"),
                         (["--prompt=x", f"--out={junk.parent}"], "not a record of `generate`")):
    assert cli.main(args + extra + ([] if any(a.startswith("--out=") for a in extra) else [
        f"--out={tmp_path / 'out'}"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / "l.db").exists()
  assert cli.main(args + ["--prompt=a photo of a sneaker", "--repeat=2", "--json",
                          f"--out={tmp_path / 'out'}"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["queries_charged"] == 2 and result["generated_now"] == 2
  assert 0 < result["epsilon_spent"] < result["epsilon_budget"]


def test_check_prompts_refuses_what_the_text_tower_cannot_take(tmp_path):
  lengths = lambda prompts: [len(p.split()) + 2 for p in prompts]
  assert generate.check_prompts(("a", "b c"), lengths, 5) == ["a", "b c"]
  for prompts, message in (([], "no prompts"), ("a bag", "not one string"),
                           ([b"a bag"], "bytes, not text"), (["ok", ""], "prompt 1 is empty"),
                           (["a b c d"], "6 tokens"),
                           (["a bag"] * (generate.MAX_IMAGES + 1), "at most 1,000,000")):
    with pytest.raises(generate.GenerateError, match=message):
      generate.check_prompts(prompts, lengths, 5)
  assert len(generate.check_prompts(["a bag"] * generate.MAX_IMAGES, lengths, 5)) == 1_000_000
  good = tmp_path / "p.txt"
  good.write_text("a photo of a bag\nune robe d'été\n", encoding="utf-8")
  assert generate.read_prompts(good) == ["a photo of a bag", "une robe d'été"]
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ok\n\xc3\x28\n")
  with pytest.raises(generate.GenerateError, match="not UTF-8 text"):
    generate.read_prompts(bad)
