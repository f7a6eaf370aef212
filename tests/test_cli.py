"""The `dprdm` command: JSON outputs, config fall-backs, and one-line errors with exit status 2."""

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from dprdm_jax import cli
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import ledger as ledger_lib

REFERENCE = ["--sigma", "0.2", "--sampling-rate", "0.01", "--neighbors", "18", "--queries", "1000",
             "--delta", "1e-7"]


def dprdm(capsys, *args):
  status = cli.main(["dprdm", *args])
  out, err = capsys.readouterr()
  return status, out, err


def test_epsilon_json(capsys):
  status, out, _ = dprdm(capsys, "privacy", "epsilon", *REFERENCE, "--json")
  assert status == 0
  result = json.loads(out)
  assert result["epsilon_rdp"] == pytest.approx(0.997, rel=0.02)
  assert result["epsilon_pld"] < result["epsilon_rdp"]
  assert result["delta"] == 1e-7 and result["noise_multiplier"] == pytest.approx(1.8)


def test_epsilon_text_names_delta_and_adjacency(capsys):
  status, out, _ = dprdm(capsys, "privacy", "epsilon", *REFERENCE[:-2], "--dataset-size", "50000",
                         "--accountant", "rdp")
  assert status == 0
  assert "delta = 2e-05 (1/N, N = 50,000)" in out and "add-or-remove-one" in out
  assert "epsilon (RDP)" in out and "PLD" not in out


def test_calibrate_solves_each_knob(capsys):
  args = ["privacy", "calibrate", "--epsilon", "1", "--sampling-rate", "0.01", "--neighbors", "18",
          "--queries", "1000", "--delta", "1e-7", "--accountant", "rdp", "--json"]
  status, out, _ = dprdm(capsys, *args)
  assert status == 0
  sigma = json.loads(out)["sigma"]
  expected = accounting.calibrate_noise_std(1.0, 0.01, 18, 1000, 1e-7, "rdp")
  assert sigma == pytest.approx(expected, rel=1e-9)
  status, out, _ = dprdm(capsys, *args, "--solve", "queries", "--sigma", "0.2")
  assert json.loads(out)["queries"] == accounting.max_queries(
      accounting.Mechanism(0.2, 0.01, 18), 1.0, 1e-7, "rdp")
  status, out, _ = dprdm(capsys, *args, "--solve", "sampling-rate", "--sigma", "0.2")
  assert json.loads(out)["sampling_rate"] == pytest.approx(0.01, rel=0.01)


def test_plan_json(capsys):
  status, out, err = dprdm(capsys, "privacy", "plan", "--dataset-size", "1000", "--epsilon", "1",
                           "--queries", "100", "--sampling-rates", "1", "--neighbors", "2,8",
                           "--json")
  assert status == 0 and "[2/2]" in err  # progress goes to stderr
  rows = json.loads(out)["rows"]
  assert [r["num_neighbors"] for r in rows] == [2, 8]
  assert rows[0]["noise_std_pld"] == pytest.approx(4 * rows[1]["noise_std_pld"])


def test_config_fills_flags_and_overrides_apply(capsys):
  status, out, _ = dprdm(capsys, "privacy", "epsilon", "--config", "configs/default.py:tiny",
                         "--config.privacy.noise_std=0.3", "--queries", "7", "--json")
  assert status == 0
  result = json.loads(out)
  assert result["sigma"] == 0.3 and result["queries"] == 7
  assert result["delta"] == 1 / 1000 and result["delta_source"] == "1/N, N = 1,000"


def test_budget_status(capsys, tmp_path):
  path = tmp_path / "ledger.db"
  mechanism = accounting.Mechanism(0.5, 0.01, 8)
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("abc123", 2.0, 1e-5, "rdp")
    ledger.charge("abc123", mechanism, 40)
  status, out, _ = dprdm(capsys, "budget", "status", "--ledger", str(path), "--json")
  assert status == 0
  [row] = json.loads(out)["datasets"]
  spent = accounting.history_epsilon({mechanism: 40}, 1e-5, "rdp")
  assert row["queries"] == 40 and row["epsilon_spent"] == pytest.approx(spent)
  assert row["epsilon_remaining"] == pytest.approx(2.0 - spent)


def test_budget_verify_and_backup(capsys, tmp_path):
  path, copy = tmp_path / "ledger.db", tmp_path / "backup.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("abc123", 2.0, 1e-5, "rdp")
    ledger.charge("abc123", accounting.Mechanism(0.5, 0.01, 8), 40)
  status, out, _ = dprdm(capsys, "budget", "verify", "--ledger", str(path))
  assert status == 0 and "sound (1 dataset(s), 40 queries" in out
  status, out, _ = dprdm(capsys, "budget", "backup", "--ledger", str(path), "--out", str(copy),
                         "--json")
  assert status == 0 and json.loads(out)["verified"] is True
  status, _, err = dprdm(capsys, "budget", "backup", "--ledger", str(path), "--out", str(copy))
  assert status == 2 and "never overwrites" in err
  db = sqlite3.connect(path)
  db.execute("UPDATE charges SET count = 1")  # hide 39 queries
  db.commit()
  db.close()
  status, _, err = dprdm(capsys, "budget", "verify", "--ledger", str(path))
  assert status == 2 and err.count("\n") == 1
  # The edit breaks the hash chain and disagrees with the per-setting totals.
  assert "failed verification, 2 problem(s)" in err and "does not match the hash chain" in err
  assert "disagree with its charges" in err


def test_audit_refuses_bad_input(capsys):
  for flags, message in ((["--trials", "5"], "trials must lie in [100, 1,000,000]"),
                         (["--delta", "0"], "delta"), (["--significance", "0.7"], "significance"),
                         # these ended in numpy allocation tracebacks (7 TiB, 745 GiB)
                         (["--trials", "1000000000000"], "got 1,000,000,000,000 and 4,000"),
                         (["--canaries", "100000000000"], "canaries in [100, 16,000]")):
    status, _, err = dprdm(capsys, "audit", *flags)
    assert status == 2 and message in err and err.count("\n") == 1


BAD = [
    (["--neighbors", "0"], "num_neighbors (k) must be an integer >= 1"),
    (["--neighbors", "-3"], "num_neighbors (k) must be an integer >= 1"),
    (["--sampling-rate", "0"], "sampling_rate (q) must lie in (0, 1]"),
    (["--sampling-rate", "1.5"], "sampling_rate (q) must lie in (0, 1]"),
    (["--sigma", "-0.1"], "noise_std (sigma) must be >= 0"),
    (["--delta", "0"], "delta must lie in (0, 1)"),
    (["--delta", "1"], "delta must lie in (0, 1)"),
    (["--queries", "0"], "must be an integer >= 1"),
    (["--sigma", "nan"], "must be a finite number"),
    (["--sampling-rate", "inf"], "must be a finite number"),
    (["--queries", "ten"], "invalid literal"),
    (["--bogus", "1"], "Unknown command line flag 'bogus'"),
]


def replace(args, change):
  args = list(args)
  for name, value in zip(change[::2], change[1::2]):
    if name in args:
      args[args.index(name) + 1] = value
    else:
      args += [name, value]
  return args


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_exits_2_with_one_line(capsys, change, message):
  status, out, err = dprdm(capsys, "privacy", "epsilon", *replace(REFERENCE, change))
  assert status == 2 and out == ""
  assert err.count("\n") == 1 and message in err and err.startswith("dprdm privacy epsilon: error:")


@pytest.mark.parametrize("config,message", [
    (["--config", "configs/nope.py"], "No such file"),
    (["--config", "configs/default.py", "--config.privacy.nonsense=1"], "nonsense"),
    (["--config", "configs/default.py:huge"], "unknown config argument 'huge'"),
    (["--config", "configs/default.py", "--config.privacy.num_neighbors=abc"], "invalid literal"),
])
def test_bad_config_exits_2_with_one_line(capsys, config, message):
  status, out, err = dprdm(capsys, "privacy", "epsilon", *config)
  assert status == 2 and out == "" and message in err and err.count("\n") == 1


def test_bad_ledger_exits_2(capsys, tmp_path):
  status, _, err = dprdm(capsys, "budget", "status", "--ledger", str(tmp_path / "none.db"))
  assert status == 2 and "no ledger file" in err and err.count("\n") == 1
  junk = tmp_path / "junk.db"
  junk.write_bytes(b"garbage" * 1000)
  junk.chmod(0o600)
  status, _, err = dprdm(capsys, "budget", "status", "--ledger", str(junk))
  assert status == 2 and "not an SQLite database" in err and err.count("\n") == 1


def test_console_script_runs_without_traceback():
  """The installed entry point, in a process of its own."""
  bad = subprocess.run([sys.executable, "-c", "from dprdm_jax import cli; cli.run()", "privacy",
                        "epsilon", *replace(REFERENCE, ["--neighbors", "0"])],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().endswith("num_neighbors (k) must be an integer >= 1, got 0")
  good = subprocess.run([sys.executable, "-c", "from dprdm_jax import cli; cli.run()", "privacy",
                         "epsilon", *REFERENCE, "--json", "--accountant", "rdp"],
                        capture_output=True, text=True)
  assert good.returncode == 0 and json.loads(good.stdout)["epsilon_pld"] is None


def test_unknown_command_and_help(capsys):
  status, _, err = dprdm(capsys, "privacy", "nothing")
  assert status == 2 and "usage: dprdm" in err
  status, out, _ = dprdm(capsys, "--help")
  assert status == 0 and "privacy epsilon" in out and "budget status" in out


def test_index_build_and_query(capsys, tmp_path):
  rng = np.random.default_rng(0)
  matrix = rng.normal(size=(300, 16)).astype(np.float32)
  queries = rng.normal(size=(3, 16)).astype(np.float32)
  np.save(tmp_path / "m.npy", matrix)
  np.save(tmp_path / "q.npy", queries)
  status, out, err = dprdm(capsys, "index", "build", "--from-npy", str(tmp_path / "m.npy"), "--out",
                           str(tmp_path / "ix"), "--json")
  assert status == 0 and "building" in err
  built = json.loads(out)
  assert built["mode"] == "exact" and built["num_rows"] == 300
  status, out, _ = dprdm(capsys, "index", "query", "--index", str(tmp_path / "ix"), "--query-file",
                         str(tmp_path / "q.npy"), "--k", "5", "--json")
  assert status == 0
  result = json.loads(out)
  unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
  expected = np.argsort(-(queries @ unit.T), axis=1)[:, :5]
  assert result["ids"] == expected.tolist()
  np.testing.assert_allclose(result["scores"], np.take_along_axis(queries @ unit.T, expected, 1),
                             rtol=1e-5)
  status, out, _ = dprdm(capsys, "index", "build", "--store", str(tmp_path / "ix" / "store"),
                         "--out", str(tmp_path / "fast"), "--config", "configs/default.py:tiny",
                         "--config.retrieval.index.num_leaves=10",
                         "--config.retrieval.index.num_leaves_to_search=3",
                         "--config.retrieval.index.training_sample_size=300", "--mode", "fast",
                         "--json")
  assert status == 0 and json.loads(out)["exact"] is False


@pytest.mark.parametrize("args,message", [
    (["index", "build", "--out", "x"], "exactly one of --store and --from-npy"),
    (["index", "build", "--from-npy", "missing.npy", "--out", "x"], "No such file"),
    (["index", "build", "--store", "missing", "--out", "x"], "not an embedding store"),
    (["index", "query", "--index", "missing", "--query-file", "q.npy"], "not an index"),
])
def test_index_bad_input_exits_2(capsys, tmp_path, monkeypatch, args, message):
  monkeypatch.chdir(tmp_path)
  status, _, err = dprdm(capsys, *args)
  assert status == 2 and message in err and err.count("\n") == 1


def test_a_bug_inside_a_job_keeps_its_traceback(tmp_path):
  # A ValueError that is not one of the project's errors (dprdm_jax/errors.py) is a bug: the
  # command must not report it as bad input.
  code = ("from dprdm_jax import cli, train\n"
          "def broken(config, workdir):\n"
          "  raise ValueError('an internal bug, not bad input')\n"
          "train.train = broken\n"
          "cli.run()")
  job = subprocess.run([sys.executable, "-c", code, "train", "--config=configs/default.py:tiny",
                        f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert job.returncode == 1
  assert "Traceback" in job.stderr and "in broken" in job.stderr
  assert job.stderr.strip().endswith("ValueError: an internal bug, not bad input")
  assert "error: an internal bug" not in job.stderr


def test_project_errors_are_the_one_line_path(capsys, monkeypatch):
  from dprdm_jax import errors  # pylint: disable=g-import-not-at-top
  from dprdm_jax import train  # pylint: disable=g-import-not-at-top

  def refuse(config, workdir):
    raise errors.MissingError(f"{workdir} holds no store")

  monkeypatch.setattr(train, "train", refuse)
  status, _, err = dprdm(capsys, "train", "--config=configs/default.py:tiny", "--workdir=w")
  assert status == 2 and err == "dprdm train: error: w holds no store\n"


def test_privacy_actions_import_no_jax_scann_flax_or_transformers():
  code = ("import sys\nfrom dprdm_jax import cli\n"
          f"assert cli.main(['dprdm', 'privacy', 'epsilon', *{REFERENCE!r}]) == 0\n"
          "print(sorted(m for m in ('jax', 'scann', 'flax', 'transformers', 'orbax', "
          "'tensorflow') if m in sys.modules))")
  job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=True)
  assert job.stdout.splitlines()[-1] == "[]"


def test_on_a_cpu_the_console_script_gives_jax_one_device_per_core():
  flag = "--xla_force_host_platform_device_count"
  env = cli.cpu_devices_environment
  assert env({}, 4, False) == f"{flag}=4"
  assert env({"XLA_FLAGS": "--xla_cpu_use_onednn=false"}, 2, False) == (
      f"--xla_cpu_use_onednn=false {flag}=2")  # other flags kept
  assert env({"JAX_PLATFORMS": "cpu"}, 2, False) == f"{flag}=2"
  assert env({"XLA_FLAGS": f"{flag}=8"}, 2, False) is None  # a count already chosen
  assert env({"JAX_PLATFORMS": "cuda"}, 16, False) is None  # an accelerator asked for
  assert env({}, 16, True) is None  # an accelerator plugin installed
  assert env({}, 1, False) is None
  # The console script itself, before jax starts: its jobs see one device per core.
  code = ("import sys\nfrom dprdm_jax import cli\nsys.argv = ['dprdm', 'privacy', "
          f"'epsilon', *{REFERENCE!r}]\n"
          "try:\n  cli.run()\nexcept SystemExit as e:\n  assert e.code == 0\n"
          "import jax\nprint(jax.device_count(), jax.default_backend())")
  plain = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=True, env=plain)
  assert job.stdout.splitlines()[-1] == f"{len(os.sched_getaffinity(0))} cpu"


JOBS = ("train-encoder", "embed", "train", "export", "sample", "generate", "train-classifier",
        "hit-rate", "evaluate")


def test_every_job_takes_workdir():
  from absl import flags  # pylint: disable=g-import-not-at-top
  jobs = {words for words, c in cli.COMMANDS.items() if c.takes_config} - {
      ("privacy", "epsilon"), ("privacy", "calibrate"), ("privacy", "plan"), ("index", "build")}
  assert jobs == {(j,) for j in JOBS}
  for words in jobs:
    fv = flags.FlagValues()
    cli.COMMANDS[words].define(fv)
    assert "workdir" in fv, words


def test_process_flags_need_a_coordinator(capsys):
  status, _, err = dprdm(capsys, "embed", "--config=configs/default.py:tiny", "--dataset=mnist5k",
                         "--num-processes=2", "--process-id=1")
  assert status == 2 and "need --coordinator or --distributed" in err
