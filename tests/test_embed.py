"""End to end on the offline default (tiny config, real MiniLM, real orbax): the image tower's
training resumes to the same parameters, and the embedding job survives SIGKILL.

Slow: each process loads MiniLM (about 25 s on two cores).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dprdm_jax import embed
from dprdm_jax import train_encoder
from dprdm_jax.encoders import image as image_lib
from dprdm_jax.retrieval import store as store_lib
from tests.test_configs import load

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("encoder")
  figures = train_encoder.train(load("configs/default.py:tiny"), workdir)
  assert set(figures) >= {"zero_shot_accuracy_public_test", "retrieval_accuracy_image_keys_top4",
                          "retrieval_accuracy_caption_keys_top4"}
  assert json.loads((workdir / "eval.json").read_text()) == figures
  # Every Fashion-MNIST record of a class has its class caption as key, so caption keys always
  # retrieve the prompted class.
  assert figures["retrieval_accuracy_caption_keys_top4"] == 1.0
  return workdir


def _params(workdir):
  return [np.asarray(x) for x in jax.tree.leaves(image_lib.load(workdir)._state)]


def test_training_resumes_to_the_uninterrupted_parameters(tower_dir, tmp_path):
  config = load("configs/default.py:tiny")
  assert train_encoder.train(config, tmp_path, stop_after=4) is None
  assert image_lib.load(tmp_path) is not None  # a usable checkpoint at step 4
  train_encoder.train(config, tmp_path)
  log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [2, 4, 6]
  for resumed, uninterrupted in zip(_params(tmp_path), _params(tower_dir)):
    np.testing.assert_array_equal(resumed, uninterrupted)


def _embed_command(tower, *where):
  return [sys.executable, "-c", "from dprdm_jax import cli; cli.run()", "embed",
          "--config=configs/default.py:tiny",
          f"--config.encoder.workdir={tower}", "--config.embed.chunk_size=500",
          "--dataset=fashion_mnist", "--split=test", *where, "--json"]


@pytest.fixture(scope="module")
def reference(tower_dir, tmp_path_factory):
  """Fashion-MNIST test embedded in one process, in 20 chunks of 500."""
  config = load("configs/default.py:tiny", f"--config.encoder.workdir={tower_dir}",
                "--config.embed.chunk_size=500")
  result = embed.embed(config, "fashion_mnist", "test", tmp_path_factory.mktemp("reference"))
  assert result["records"] == 10_000 and result["embedded_now"] == 10_000
  return result


def test_embedding_job_survives_sigkill(tower_dir, reference, tmp_path):
  out = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  job = subprocess.Popen(_embed_command(tower_dir, f"--out={out}"), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # Finished chunks only: a chunk being written is chunk-NNNNN.tmp.npz until it is renamed.
  finished = lambda: sorted(p.name for p in (out / "chunks").glob("chunk-?????.npz"))
  deadline = time.monotonic() + 300
  while len(finished()) < 3:
    assert job.poll() is None, job.stderr.read().decode()[-2000:]
    assert time.monotonic() < deadline
    time.sleep(0.01)
  job.send_signal(signal.SIGKILL)
  job.wait()
  done = finished()
  assert 3 <= len(done) < 20, done
  assert not (out / "images" / "manifest.json").exists()

  rerun = subprocess.run(_embed_command(tower_dir, f"--out={out}"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=True)
  result = json.loads(rerun.stdout)
  assert result["embedded_now"] == 10_000 - 500 * len(done)
  for kind in embed.KINDS:
    resumed = store_lib.EmbeddingStore(out / kind)
    assert resumed.fingerprint == reference["stores"][kind]["fingerprint"]
    assert resumed.payload[:3] == ["a photo of an ankle boot", "a photo of a pullover",
                                   "a photo of a pair of trousers"]
  assert not (out / "chunks").exists()


def test_two_processes_meet_at_a_barrier_and_write_the_same_stores(tower_dir, reference,
                                                                  tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  jobs = [subprocess.Popen(_embed_command(tower_dir, f"--workdir={tmp_path}",
                                          f"--coordinator=localhost:{port}",
                                          "--num-processes=2", f"--process-id={i}"),
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]
  results = []
  for job in jobs:
    out, err = job.communicate(timeout=900)
    assert job.returncode == 0, err[-3000:]
    # The JSON is the last line: on CPU, gloo's C++ side prints its connections to stdout.
    results.append(json.loads(out.splitlines()[-1]))
  # Each process embedded its own 10 chunks; both return after process 0 wrote the stores.
  assert [r["embedded_now"] for r in results] == [5_000, 5_000]
  out = tmp_path / "fashion_mnist-test"
  for kind in embed.KINDS:
    fingerprint = reference["stores"][kind]["fingerprint"]
    assert store_lib.EmbeddingStore(out / kind).fingerprint == fingerprint
    assert [r["stores"][kind]["fingerprint"] for r in results] == [fingerprint] * 2
  assert not (out / "chunks").exists()


def test_embed_refuses_finished_output(tower_dir, tmp_path):
  config = load("configs/default.py:tiny", f"--config.encoder.workdir={tower_dir}")
  embed.embed(config, "mnist5k", "test", tmp_path)
  with pytest.raises(ValueError, match="already holds embedding stores"):
    embed.embed(config, "mnist5k", "test", tmp_path)
