"""End to end on the offline default (tiny config, real MiniLM, real orbax): the image tower's
training resumes to the same parameters, and the embedding job survives SIGKILL.

Slow: each process loads MiniLM (about 25 s on two cores).
"""

import json
import os
import pathlib
import signal
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
  log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [2, 4, 6]
  for resumed, uninterrupted in zip(_params(tmp_path), _params(tower_dir)):
    np.testing.assert_array_equal(resumed, uninterrupted)


def _embed_command(tower, out):
  return [sys.executable, "-c", "from dprdm_jax import cli; cli.run()", "embed",
          "--config=configs/default.py:tiny",
          f"--config.encoder.workdir={tower}", "--config.embed.chunk_size=500",
          "--dataset=fashion_mnist", "--split=test",
          f"--out={out}", "--json"]


def test_embedding_job_survives_sigkill(tower_dir, tmp_path):
  config = load("configs/default.py:tiny", f"--config.encoder.workdir={tower_dir}",
                "--config.embed.chunk_size=500")
  reference = embed.embed(config, "fashion_mnist", "test", tmp_path / "reference")
  assert reference["records"] == 10_000 and reference["embedded_now"] == 10_000

  out = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  job = subprocess.Popen(_embed_command(tower_dir, out), cwd=ROOT, env=env,
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

  rerun = subprocess.run(_embed_command(tower_dir, out), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=True)
  result = json.loads(rerun.stdout)
  assert result["embedded_now"] == 10_000 - 500 * len(done)
  for kind in embed.KINDS:
    resumed = store_lib.EmbeddingStore(out / kind)
    assert resumed.fingerprint == reference["stores"][kind]["fingerprint"]
    assert resumed.payload[:3] == ["a photo of an ankle boot", "a photo of a pullover",
                                   "a photo of a pair of trousers"]
  assert not (out / "chunks").exists()


def test_embed_refuses_finished_output(tower_dir, tmp_path):
  config = load("configs/default.py:tiny", f"--config.encoder.workdir={tower_dir}")
  embed.embed(config, "mnist5k", "test", tmp_path)
  with pytest.raises(ValueError, match="already holds embedding stores"):
    embed.embed(config, "mnist5k", "test", tmp_path)
