"""Every command README.md shows in its ```bash blocks is run by a test, or exempt with a reason.

The guard (test_every_readme_command_is_run_by_a_test_or_exempt, fast) reads the README's bash
blocks, one command per line (a line ending in a backslash continues on the next; lines that are
only comments are not commands), reduces each command to its signature (below) and looks it up in
COVERED (the pytest node ids of the tests that run it) or EXEMPT (why no test runs it). A command
that is in neither fails the guard, and so does a table entry that names a test function that does
not exist or a command that is no longer in the README.

The other tests here run the README's commands that no other test ran, taking each command from
the README itself (with the tiny config and scratch paths in place of the full-size ones), so that
what runs is what the README shows. The slow ones share the tiny trained product of
tests/conftest.py.
"""

import ast
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands(text: str | None = None) -> list[str]:
  """The command lines of the README's ```bash blocks, continuation lines joined."""
  text = README.read_text() if text is None else text
  commands = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
    for line in block.replace("\\\n", "").splitlines():  # bash drops backslash-newline
      if shlex.split(line, comments=True):  # not blank, not only a comment
        commands.append(" ".join(line.split()))
  return commands


_WORD = re.compile(r"[a-z][a-z0-9-]*\Z")  # subcommands and word values: train, public, my-tpu


def signature(command: str) -> str:
  """A command without its paths, numbers and quoted text: its program, its words (lower-case
  words such as subcommands, --mode values and the TPU's name) and its flags' names, in order.
  `[--flag=X]` (an optional flag) counts as --flag; `python -c CODE` keeps the modules CODE
  imports."""
  words, tokens = [], shlex.split(command, comments=True)
  for i, token in enumerate(tokens):
    token = token.strip("[]")
    if token.startswith("-"):
      words.append(token.split("=", 1)[0])
    elif i and tokens[i - 1] == "-c":
      words += [f"import:{m}" for m in sorted(set(re.findall(r"\bimport (\w+)", token)))]
    elif _WORD.match(token) or token.startswith(("launch/", ".venv/bin/")):
      words.append(token)
  return " ".join(words)


THIS = "tests/test_readme.py"
LAUNCH_README = "tests/test_launch.py::test_readme_launcher_commands_run"
REAL_DATA = "tests/test_real_data_configs.py::test_every_job_of_both_real_data_configs"

# A README command's signature -> the tests that run it (the same command and flags; the tiny
# config and scratch paths stand in for the full-size ones).
COVERED: dict[str, tuple[str, ...]] = {
    ".venv/bin/dprdm generate --config --config.generate.checkpoint --prompt --repeat --out": (
        f"{THIS}::test_readme_console_script_generates_from_a_release_and_scores_hit_rates",
        REAL_DATA),
    ".venv/bin/dprdm hit-rate --config --dirs": (
        f"{THIS}::test_readme_console_script_generates_from_a_release_and_scores_hit_rates",),
    "dprdm privacy epsilon --sigma --sampling-rate --neighbors --queries --delta": (
        f"{THIS}::test_readme_privacy_commands", "tests/test_cli.py::test_epsilon_json"),
    "dprdm privacy calibrate --epsilon --sampling-rate --neighbors --queries --dataset-size": (
        f"{THIS}::test_readme_privacy_commands",),
    "dprdm privacy plan --dataset-size --epsilon --queries": (
        f"{THIS}::test_readme_privacy_commands",),
    "dprdm budget status --ledger": (
        f"{THIS}::test_readme_budget_commands", "tests/test_cli.py::test_budget_status"),
    "dprdm budget verify --ledger": (
        f"{THIS}::test_readme_budget_commands",
        "tests/test_cli.py::test_budget_verify_and_backup"),
    "dprdm budget backup --ledger --out": (
        f"{THIS}::test_readme_budget_commands",
        "tests/test_cli.py::test_budget_verify_and_backup"),
    "dprdm index build --from-npy --out --mode exact": (
        f"{THIS}::test_readme_index_commands", "tests/test_cli.py::test_index_build_and_query"),
    "dprdm index build --store --out --mode fast": (
        f"{THIS}::test_readme_index_commands", "tests/test_cli.py::test_index_build_and_query"),
    "dprdm index query --index --query-file --k --json": (
        f"{THIS}::test_readme_index_commands", "tests/test_cli.py::test_index_build_and_query"),
    "dprdm sample --config": (
        f"{THIS}::test_readme_sample_writes_samples_png_in_the_training_workdir",
        "tests/test_train.py::test_sample_grid_is_drawn_from_public_test_neighbours"),
    "dprdm generate --config --prompt --repeat --out": (
        "tests/test_generate.py::test_cli_generates_and_refuses_bad_input_in_one_line",),
    "dprdm generate --config --prompts --out --ledger": (
        f"{THIS}::test_readme_generate_from_a_prompts_file_and_in_each_mode",),
    "dprdm generate --mode public": (
        f"{THIS}::test_readme_generate_from_a_prompts_file_and_in_each_mode", REAL_DATA),
    "dprdm generate --mode none": (
        f"{THIS}::test_readme_generate_from_a_prompts_file_and_in_each_mode",),
    "dprdm generate --mode nonprivate --allow-nonprivate": (
        f"{THIS}::test_readme_generate_from_a_prompts_file_and_in_each_mode",),
    "dprdm evaluate --config --config.generate.checkpoint --workdir": (
        f"{THIS}::test_readme_evaluate_with_a_release_and_a_workdir", REAL_DATA),
    "bash launch/tpu.sh --create v4-32 my-tpu us-central2-b train --config --config.mesh.fsdp "
    "--workdir": (
        LAUNCH_README,
        "tests/test_launch.py::test_tpu_full_sequence_create_copy_setup_run_logs_delete"),
    "bash launch/tpu.sh my-tpu us-central2-b embed --config --dataset --split --workdir": (
        LAUNCH_README,),
    "bash launch/tpu.sh my-tpu us-central2-b logs train": (
        LAUNCH_README, "tests/test_launch.py::test_tpu_logs_fetches_every_workers_log"),
    "bash launch/tpu.sh my-tpu us-central2-b stop": (
        LAUNCH_README,
        "tests/test_launch.py::test_tpu_stop_kills_only_the_jobs_it_started_and_copy_waits_for_"
        "them"),
    "bash launch/tpu.sh --dry-run my-tpu us-central2-b train --config": (
        LAUNCH_README,
        "tests/test_launch.py::test_tpu_dry_run_prints_every_command_and_issues_none"),
    "bash launch/tpu.sh my-tpu us-central2-b delete": (LAUNCH_README,),
    "bash launch/gpu.sh train --config": (
        LAUNCH_README, "tests/test_launch.py::test_gpu_sets_up_cuda_jax_then_runs_the_job"),
    "bash launch/gpu.sh --dry-run generate --config --prompt": (
        LAUNCH_README, "tests/test_launch.py::test_gpu_dry_run_prints_the_commands"),
}

# A README command's signature -> (why no test runs it, the tests that run its parts or its tiny
# version, if any).
EXEMPT: dict[str, tuple[str, tuple[str, ...]]] = {
    "bash launch/local.sh demo": (
        "the full-size main job (about 25 minutes on 2 cores); its dprdm steps run on the tiny "
        "config in the tests listed under their own commands", ()),
    "bash launch/local.sh test": (
        "runs this test suite itself (15-20 minutes on 2 cores)", ()),
    "bash launch/local.sh train --config": (
        "trains the full default U-Net (about 40 minutes on 2 cores); `dprdm train` on the tiny "
        "config, a rerun resuming, runs in these tests",
        ("tests/test_train.py::test_sigkill_resumes_to_the_same_parameters_on_one_device",
         REAL_DATA)),
    "python -c import:transformers": (
        "downloads CLIP from the Hugging Face Hub (needs the internet); a tiny CLIP saved and "
        "loaded by path stands in",
        ("tests/encoders/test_clip.py::test_round_trip_gives_identical_features", REAL_DATA)),
    "tfds build cifar10 imagenet2012 --file_format --data_dir": (
        "downloads the datasets (needs the internet; ImageNet's archives by hand); ArrayRecord "
        "splits written the way tfds writes them stand in",
        ("tests/data/test_tfds_source.py::test_real_cifar10_records", REAL_DATA)),
}


def uncovered(commands: list[str]) -> list[str]:
  """The commands whose signature is neither in COVERED nor in EXEMPT."""
  return [f"{c!r} (signature {signature(c)!r})" for c in commands
          if signature(c) not in COVERED and signature(c) not in EXEMPT]


def _test_functions(path: pathlib.Path) -> set[str]:
  """The test functions a test file defines: `name` at the top level, `Class::name` in classes
  (read with ast: no test module, jax or the like is imported)."""
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
      names.add(node.name)
    elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
      names |= {f"{node.name}::{f.name}" for f in node.body
                if isinstance(f, ast.FunctionDef) and f.name.startswith("test")}
  return names


def test_every_readme_command_is_run_by_a_test_or_exempt():
  commands = readme_commands()
  assert len(commands) >= 30, commands  # the parser found the blocks
  missing = uncovered(commands)
  assert not missing, (
      "README commands that no test runs; add a test that runs each and its node id to COVERED "
      "in tests/test_readme.py (or a reason to EXEMPT):\n  " + "\n  ".join(missing))
  signatures = {signature(c) for c in commands}
  stale = sorted((set(COVERED) | set(EXEMPT)) - signatures)
  assert not stale, f"entries of tests/test_readme.py for commands no longer in the README: {stale}"
  assert not set(COVERED) & set(EXEMPT)
  node_ids = [n for ids in COVERED.values() for n in ids]
  node_ids += [n for _, ids in EXEMPT.values() for n in ids]
  assert all(COVERED.values()) and all(reason for reason, _ in EXEMPT.values())
  functions = {}
  for node_id in node_ids:
    path, name = node_id.split("::", 1)
    if path not in functions:
      assert (ROOT / path).is_file(), node_id
      functions[path] = _test_functions(ROOT / path)
    assert name in functions[path], f"{node_id}: no such test"


def test_the_guard_joins_continuations_skips_comments_and_catches_a_new_command():
  text = ("# Title\n\n```bash\n# only a comment\ndprdm privacy plan --dataset-size 10 \\\n"
          "    --epsilon 1 --queries 5   # a comment\n\n```\n\n```python\nprint('not bash')\n```\n"
          "```bash\ndprdm privacy plan --dataset-size 9 --epsilon 2 --queries 1 --json\n"
          "bash launch/tpu.sh my-tpu us-central2-b delete\n```\n")
  commands = readme_commands(text)
  assert commands == ["dprdm privacy plan --dataset-size 10 --epsilon 1 --queries 5 # a comment",
                      "dprdm privacy plan --dataset-size 9 --epsilon 2 --queries 1 --json",
                      "bash launch/tpu.sh my-tpu us-central2-b delete"]
  assert signature(commands[0]) == "dprdm privacy plan --dataset-size --epsilon --queries"
  # Another flag makes another command: a table entry of its own is needed.
  assert uncovered(commands) == [
      f"{commands[1]!r} (signature 'dprdm privacy plan --dataset-size --epsilon --queries --json')"]
  assert signature('dprdm evaluate --config c.py [--config.x.y=a/b] [--workdir DIR]') == (
      "dprdm evaluate --config --config.x.y --workdir")
  assert signature("""python -c "import os; import json as j" """) == (
      "python -c import:json import:os")


def test_readme_dprdm_commands_name_real_commands_and_flags():
  """Each `dprdm` command of the README names a command of the CLI and flags that it defines."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dprdm_jax import cli  # pylint: disable=g-import-not-at-top
  checked = 0
  for command in readme_commands():
    argv = [a.strip("[]") for a in shlex.split(command, comments=True)]
    if not argv[0].endswith("dprdm"):
      continue
    words = cli._find(argv)  # pylint: disable=protected-access
    assert words, command
    fv = flags.FlagValues()
    cli.COMMANDS[words].define(fv)
    for arg in argv[1 + len(words):]:
      if arg.startswith("--"):
        name = arg[2:].split("=", 1)[0]
        if name == "config" or name.startswith("config."):
          assert cli.COMMANDS[words].takes_config, (command, name)
        else:
          assert name in fv, (command, name)
    checked += 1
  assert checked >= 15


def _readme(sig: str) -> list[str]:
  """The README command of this signature, as argv."""
  found = [c for c in readme_commands() if signature(c) == sig]
  assert len(found) == 1, (sig, found)
  return shlex.split(found[0], comments=True)


def _dprdm(capsys, argv):
  assert argv[0] == "dprdm", argv
  from dprdm_jax import cli  # pylint: disable=g-import-not-at-top
  status = cli.main(argv)
  out, err = capsys.readouterr()
  assert status == 0, (argv, err)
  return out


def test_readme_privacy_commands(capsys):
  from dprdm_jax.privacy import accounting  # pylint: disable=g-import-not-at-top
  out = _dprdm(capsys, _readme(
      "dprdm privacy epsilon --sigma --sampling-rate --neighbors --queries --delta"))
  eps = {acc: float(e) for acc, e in re.findall(r"epsilon \((RDP|PLD)\) = ([\d.]+)", out)}
  assert set(eps) == {"RDP", "PLD"} and 0 < eps["PLD"] < eps["RDP"]

  argv = _readme(
      "dprdm privacy calibrate --epsilon --sampling-rate --neighbors --queries --dataset-size")
  out = _dprdm(capsys, argv)
  value = lambda flag: float(argv[argv.index(flag) + 1])
  sigma = float(re.match(r"sigma = ([\d.e-]+)\n", out).group(1))  # 6 significant digits
  achieved = float(re.search(r"achieved epsilon = ([\d.]+)", out).group(1))
  assert f"(1/N, N = {int(value('--dataset-size')):,}), PLD accountant" in out
  assert 0.99 * value("--epsilon") < achieved <= value("--epsilon")
  mechanism = accounting.Mechanism(sigma, value("--sampling-rate"), int(value("--neighbors")))
  assert accounting.history_epsilon({mechanism: int(value("--queries"))},
                                    1 / value("--dataset-size"), "pld") == pytest.approx(
                                        achieved, rel=1e-3)

  out = _dprdm(capsys, _readme("dprdm privacy plan --dataset-size --epsilon --queries"))
  rows = [line.split() for line in out.splitlines() if re.match(r" *[\d.]+ +[\d,]+ +\d+ ", line)]
  assert len(rows) == 4 * 7  # the default grid: 4 sampling rates x 7 values of k
  assert all(float(r[4]) > 0 and float(r[6]) > 0 for r in rows)


def test_readme_budget_commands(capsys, tmp_path, monkeypatch):
  from dprdm_jax.privacy import accounting  # pylint: disable=g-import-not-at-top
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  status = _readme("dprdm budget status --ledger")
  ledger = pathlib.Path(status[status.index("--ledger") + 1])
  assert not ledger.is_absolute()
  with ledger_lib.Ledger(ledger, create=True) as book:
    book.register("abc123", 10.0, 1e-5)
    book.charge("abc123", accounting.Mechanism(0.5, 0.01, 8), 40)
  out = _dprdm(capsys, status)
  assert f"Ledger {ledger}: 1 dataset(s)" in out and "abc123: 40 queries, epsilon spent" in out
  out = _dprdm(capsys, _readme("dprdm budget verify --ledger"))
  assert "sound (1 dataset(s), 40 queries" in out
  backup = _readme("dprdm budget backup --ledger --out")
  copy = tmp_path / backup[backup.index("--out") + 1].lstrip("/")  # /safe/place/... in tmp_path
  copy.parent.mkdir(parents=True)
  backup[backup.index("--out") + 1] = str(copy)
  out = _dprdm(capsys, backup)
  assert "(verified)" in out and oct(copy.stat().st_mode & 0o777) == oct(0o600)


def test_readme_index_commands(capsys, tmp_path, monkeypatch):
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  exact = _readme("dprdm index build --from-npy --out --mode exact")
  fast = _readme("dprdm index build --store --out --mode fast")
  query = _readme("dprdm index query --index --query-file --k --json")
  rng = np.random.default_rng(0)
  matrix = rng.normal(size=(300, 16)).astype(np.float32)
  queries = rng.normal(size=(3, 16)).astype(np.float32)
  np.save(exact[exact.index("--from-npy") + 1], matrix)
  np.save(query[query.index("--query-file") + 1], queries)
  store_lib.EmbeddingStore.write(pathlib.Path(fast[fast.index("--store") + 1]),
                                 rng.normal(size=(400, 16)).astype(np.float32))
  assert "exact index of 300 records" in _dprdm(capsys, exact)
  out = _dprdm(capsys, fast)
  assert "fast index of 400 records" in out and "approximate" in out
  result = json.loads(_dprdm(capsys, query))
  k = int(query[query.index("--k") + 1])
  unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
  assert result["mode"] == "exact"
  assert result["ids"] == np.argsort(-(queries @ unit.T), axis=1)[:, :k].tolist()


# The slow tests: the tiny config's towers, stores, U-Net and classifier (tests/conftest.py).


def _tiny(argv: list[str], overrides, **replace) -> list[str]:
  """The README's argv on the tiny config: configs/default.py becomes configs/default.py:tiny and
  the product's overrides; each replace key (a README path) becomes its value."""
  out = []
  for token in argv:
    token = token.strip("[]")
    if token == "configs/default.py":
      out += [f"{ROOT / 'configs' / 'default.py'}:tiny", *overrides]
      continue
    flag, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
    out.append(flag + eq + str(replace.get(value, value)))
  return out


@pytest.fixture(scope="module")
def tiny_release(tiny_product, tmp_path_factory):
  """A release (`dprdm export`) of the tiny product's U-Net."""
  from dprdm_jax import release  # pylint: disable=g-import-not-at-top
  from tests.test_configs import load  # pylint: disable=g-import-not-at-top
  root, overrides = tiny_product
  out = tmp_path_factory.mktemp("release") / "offline-tiny"
  release.export(load("configs/default.py:tiny", *overrides), root / "unet", out,
                 command="dprdm export")
  return out


def _records(directory: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_readme_console_script_generates_from_a_release_and_scores_hit_rates(
    tiny_product, tiny_release, tmp_path):
  """The README's two `.venv/bin/dprdm` lines, in that order, through the console script: the
  images land where the README's hit-rate line reads them."""
  _, overrides = tiny_product
  # No training run: the U-Net can only come from the release.
  overrides = [*overrides, f"--config.train.workdir={tmp_path / 'no-training-run'}"]
  script = pathlib.Path(sys.executable).parent / "dprdm"
  assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
  results = []
  for sig in (".venv/bin/dprdm generate --config --config.generate.checkpoint --prompt --repeat "
              "--out", ".venv/bin/dprdm hit-rate --config --dirs"):
    argv = _tiny(_readme(sig), overrides, **{"releases/offline-default": tiny_release})
    assert argv[0] == ".venv/bin/dprdm"
    results.append(subprocess.run([str(script), *argv[1:]], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=1200, check=False))
    assert results[-1].returncode == 0, (argv, results[-1].stderr[-3000:])
  generated, hits = results
  argv = _readme(".venv/bin/dprdm generate --config --config.generate.checkpoint --prompt "
                 "--repeat --out")
  prompt, repeat = argv[argv.index("--prompt") + 1], int(argv[argv.index("--repeat") + 1])
  directory = argv[argv.index("--out") + 1]
  assert _readme(".venv/bin/dprdm hit-rate --config --dirs")[-1] == directory
  assert f"wrote {repeat} of {repeat} images (private) to {directory}" in generated.stdout
  records = _records(tmp_path / directory)
  assert [r["prompt"] for r in records] == [prompt] * repeat
  assert all(r["mode"] == "private" for r in records)
  assert re.match(rf"{re.escape(directory)}: private, {repeat} images, class hit-rate "
                  r"[\d.]+ \+- [\d.]+, domain hit-rate", hits.stdout), hits.stdout


@pytest.mark.slow
def test_readme_generate_from_a_prompts_file_and_in_each_mode(tiny_product, tmp_path, monkeypatch,
                                                             capsys):
  """The README's `dprdm generate` lines with a prompts file and the ones that differ by their
  mode (`dprdm generate ... --mode X`: the same prompts into a directory per mode)."""
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  _, overrides = tiny_product
  monkeypatch.chdir(tmp_path)
  private = _tiny(_readme("dprdm generate --config --prompts --out --ledger"), overrides)
  prompts = pathlib.Path(private[private.index("--prompts") + 1])
  prompts.write_text("a photo of a sneaker\na photo of a bag\na photo of a dress\n")
  _dprdm(capsys, private)
  out, ledger = (pathlib.Path(private[private.index(f) + 1]) for f in ("--out", "--ledger"))
  assert [r["prompt"] for r in _records(out)] == prompts.read_text().splitlines()
  assert all(r["mode"] == "private" and r["epsilon_spent"] > 0 for r in _records(out))
  with ledger_lib.Ledger(ledger) as book:
    (status,) = book.status()
  assert status.queries == 3
  for mode, extra in (("public", ()), ("none", ()), ("nonprivate", ("--allow-nonprivate",))):
    argv = _readme(" ".join(["dprdm generate --mode", mode, *extra]))
    assert argv[:3] == ["dprdm", "generate", "..."]
    argv[2:3] = _tiny(["--config", "configs/default.py"], overrides) + [
        "--prompts", str(prompts), "--out", f"runs/{mode}"]
    _dprdm(capsys, argv)
    records = _records(tmp_path / "runs" / mode)
    assert [r["prompt"] for r in records] == prompts.read_text().splitlines()
    assert all(r["mode"] == mode and r["query"] is None for r in records)
    assert records[0]["epsilon"] == ("inf" if mode == "nonprivate" else 0.0)
    assert len(list((tmp_path / "runs" / mode).glob("0000*.png"))) == 3
  with ledger_lib.Ledger(ledger) as book:
    assert book.status()[0].queries == 3  # the free modes charged nothing
  assert not (tmp_path / "runs" / "default").exists()  # nor made the config's own ledger


@pytest.mark.slow
def test_readme_sample_writes_samples_png_in_the_training_workdir(tiny_product, tmp_path, capsys):
  root, overrides = tiny_product
  workdir = tmp_path / "unet"
  shutil.copytree(root / "unet", workdir)
  argv = _tiny(_readme("dprdm sample --config"), [*overrides,
                                                  f"--config.train.workdir={workdir}"])
  out = _dprdm(capsys, argv)
  assert f"wrote {workdir / 'samples.png'}: 20 public test images x 6 samples" in out
  k, tile = 4, 32 * 2 + 2  # the tiny config's neighbours; 32x32 tiles at scale 2, 2-pixel gaps
  assert np.asarray(Image.open(workdir / "samples.png")).shape == (
      20 * tile + 2, (1 + k + 1 + 6) * tile + 2)


@pytest.mark.slow
def test_readme_evaluate_with_a_release_and_a_workdir(tiny_product, tiny_release, tmp_path,
                                                     monkeypatch, capsys):
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  _, overrides = tiny_product
  monkeypatch.chdir(tmp_path)
  # runs/default does not exist here: the evaluation ledger (config.evaluate.ledger,
  # runs/default/eval-ledger.db) makes its folder.
  overrides = [*overrides, f"--config.train.workdir={tmp_path / 'no-training-run'}"]
  argv = _tiny(_readme("dprdm evaluate --config --config.generate.checkpoint --workdir"),
               overrides, **{"releases/offline-default": tiny_release, "DIR": "report"})
  out = _dprdm(capsys, argv)
  assert out.startswith("report: report/report.md (best private setting ")
  for mode in ("private", "public", "nonprivate", "none"):
    assert re.search(rf"^ +{mode}: epsilon ", out, re.M), out
  assert "## The comparison" in (tmp_path / "report" / "report.md").read_text()
  results = json.loads((tmp_path / "report" / "results.json").read_text())
  with ledger_lib.Ledger(tmp_path / "runs" / "default" / "eval-ledger.db") as book:
    (status,) = book.status()
  assert status.queries > 0 and results["best"]
  assert not (tmp_path / "runs" / "default" / "ledger.db").exists()  # the deployment ledger
  assert os.listdir(tmp_path / "report" / "grids")
