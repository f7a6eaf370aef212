"""Training on meshes: 1 device = 8 devices (data) = 8 devices (fsdp), one compilation; orbax
checkpoints restore across device counts; SIGKILL and resume; two processes = one; the sample
grid of the trained model.

The tiny config with the real pipeline: the public images, their training neighbours in a store
of embeddings from the tiny image tower (trained by `train_encoder`), the real U-Net, optax and
orbax. Slow: every mesh compiles the U-Net's step (tens of seconds each on two cores).
"""

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

from dprdm_jax import cli
from dprdm_jax import errors
from dprdm_jax import sample
from dprdm_jax import sharding
from dprdm_jax import train
from dprdm_jax import train_encoder
from dprdm_jax.data import offline
from dprdm_jax.data import pipeline
from dprdm_jax.encoders import linear as linear_lib
from dprdm_jax.retrieval import public
from dprdm_jax.retrieval import store as store_lib
from tests.test_configs import load

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  """The tiny config's image towers, fitted by the real train-encoder job (6 steps)."""
  workdir = tmp_path_factory.mktemp("tower")
  train_encoder.train(load("configs/default.py:tiny"), workdir)
  return workdir


@pytest.fixture(scope="module")
def embeddings(tower, tmp_path_factory):
  """A store of the public train split's image embeddings (the tiny config's linear tower), with
  its training neighbours."""
  source = offline.load("public", "train")
  path = tmp_path_factory.mktemp("embeddings") / "images"
  store = store_lib.EmbeddingStore.write(path, linear_lib.load(tower).encode_images(source.images),
                                         ids=source.ids)
  public.training_neighbors(store, 4)
  return path


def _config(embeddings, *overrides):
  return load("configs/default.py:tiny", f"--config.train.embeddings={embeddings}", *overrides)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_sharded_steps_equal_the_single_device_step_and_compile_once(embeddings):
  config = _config(embeddings)
  source = offline.load("public", "train")
  stream = iter(pipeline.TrainBatches(
      source, config.train.batch_size, 0,
      transform=train.NeighbourContext(source, embeddings, config.train.num_neighbors)))
  local = [next(stream), next(stream)]
  single = train.Trainer(config, sharding.make_mesh({}, jax.devices()[:1]))
  initial = _host(single.init(0))
  results = {}
  for name, shape in (("single", None), ("data", {"data": 8}), ("fsdp", {"fsdp": 8})):
    trainer = single if shape is None else train.Trainer(config, sharding.make_mesh(shape))
    state = jax.device_put(initial, trainer.state_shardings)
    losses = []
    for batch in local:
      state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.mesh))
      losses.append(float(metrics["loss"]))
    assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
    results[name] = (losses, _host(state))
    if name == "fsdp":
      specs = [s.spec for s in jax.tree.leaves(trainer.state_shardings["params"])]
      assert any("fsdp" in spec for spec in specs)
      assert trainer.notes  # e.g. the 1-channel input convolution stays whole
  for name in ("data", "fsdp"):
    np.testing.assert_allclose(results[name][0], results["single"][0], rtol=1e-5)
    _assert_close(results[name][1], results["single"][1])
  assert int(results["single"][1]["step"]) == 2
  assert not np.allclose(results["single"][0][0], 1.0)  # it is a real loss, not a constant


def _train_command(embeddings, workdir, *extra):
  return [sys.executable, "-c", "from dprdm_jax import cli; cli.run()", "train",
          "--config=configs/default.py:tiny", f"--config.train.embeddings={embeddings}",
          f"--workdir={workdir}", "--json", *extra]


def _env(devices):
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  return dict(os.environ, PYTHONPATH=str(ROOT),
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


def _final_params(config, workdir):
  trainer = train.Trainer(config, sharding.make_mesh({}, jax.devices()[:1]))
  state = train.restore(trainer, workdir)
  assert len(jax.devices()[:1]) == 1 and all(
      len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state))
  return _host(state)


@pytest.fixture(scope="module")
def uninterrupted(embeddings, tmp_path_factory):
  """An 8-device run of the tiny config (8 steps), in process."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train.train(_config(embeddings), workdir)
  assert result["steps"] == 8 and result["trace_count"] == 1
  return workdir


def test_sigkill_resumes_to_the_same_parameters_on_one_device(embeddings, uninterrupted,
                                                              tmp_path):
  workdir = tmp_path / "killed"
  job = subprocess.Popen(_train_command(embeddings, workdir), cwd=ROOT, env=_env(8),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 900
  while not (workdir / "checkpoints" / "4").is_dir():
    assert job.poll() is None, job.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.02)
  job.send_signal(signal.SIGKILL)
  job.wait()
  assert not (workdir / "checkpoints" / "8").exists()
  resumed = subprocess.run(_train_command(embeddings, workdir), cwd=ROOT, env=_env(8),
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stderr
  config = _config(embeddings)
  # Saved on 8 devices, restored on 1: identical to the uninterrupted run's final state.
  a, b = _final_params(config, workdir), _final_params(config, uninterrupted)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) >= 4


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(embeddings, uninterrupted, tmp_path):
  workdir = tmp_path / "two"
  port = _free_port()
  jobs = [subprocess.Popen(
      _train_command(embeddings, workdir, f"--coordinator=localhost:{port}",
                     "--num-processes=2", f"--process-id={i}"),
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  for job in jobs:
    _, err = job.communicate(timeout=1200)
    assert job.returncode == 0, err.decode()[-3000:]
  config = _config(embeddings)
  _assert_close(_final_params(config, workdir), _final_params(config, uninterrupted))


def test_sample_grid_is_drawn_from_public_test_neighbours(embeddings, tower, uninterrupted,
                                                          tmp_path):
  overrides = (f"--config.train.embeddings={embeddings}", f"--config.encoder.workdir={tower}",
               "--config.diffusion.sample_steps=3")
  out = tmp_path / "grid.png"
  assert cli.main(["dprdm", "sample", "--config=configs/default.py:tiny", *overrides,
                   f"--workdir={uninterrupted}", f"--out={out}", "--rows=3", "--per-row=2"]) == 0
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = np.asarray(Image.open(out))
  k, tile = 4, 32 * 2 + 2  # tiles are 32x32 images at scale 2, 2-pixel gaps
  assert picture.shape == (3 * tile + 2, (1 + k + 1 + 2) * tile + 2)
  at = lambda i, j: picture[2 + i * tile:2 + i * tile + 64:2, 2 + j * tile:2 + j * tile + 64:2]

  # Column 0: one public test image per class; then its k exact nearest public training images.
  test, train_split = offline.load("public", "test"), offline.load("public", "train")
  rows = test.read(sample.pick_rows(test, 3))
  assert rows["label"].tolist() == [0, 1, 2]
  store = store_lib.EmbeddingStore(embeddings)
  keys = np.asarray(store.embeddings, np.float32)
  scores = linear_lib.load(tower).encode_images(rows["image"]) @ keys.T
  best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  for i in range(3):
    np.testing.assert_array_equal(at(i, 0), rows["image"][i, ..., 0])
    neighbours = train_split.read(sample.positions_of(train_split, store.ids[best[i]]))["image"]
    for j in range(k):
      np.testing.assert_array_equal(at(i, 1 + j), neighbours[j, ..., 0])

  # The samples: the EMA model drawn from the mean of those neighbours (6 images padded to the
  # 8 devices), the same pixels for the same seed; two samples of one context differ.
  config = _config(embeddings, *overrides[1:])
  trainer, params, step = sample.load_ema(config, uninterrupted, sharding.make_mesh(config.mesh))
  assert step == 8
  contexts = np.repeat(keys[best].mean(axis=1, keepdims=True), 2, axis=0)
  expected = sample.to_uint8(sample.draw(trainer, params, contexts, config.seed))
  for i in range(3):
    for j in range(2):
      np.testing.assert_array_equal(at(i, 1 + k + 1 + j), expected[2 * i + j, ..., 0])
  assert not np.array_equal(expected[0], expected[1])


@pytest.mark.parametrize("steps", [0, -1])
def test_no_steps_is_refused_before_a_work_directory_is_made(steps, tmp_path):
  with pytest.raises(errors.InputError, match="steps must be >= 1"):
    train.train(load("configs/default.py:tiny", f"--config.train.steps={steps}"), tmp_path / "w")
  assert not (tmp_path / "w").exists()
