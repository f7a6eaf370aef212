"""configs/coco.py and configs/cifar10.py, every job, on tiny shapes through the `dprdm` command.

The real code paths on real files: tensorflow-datasets splits written as ArrayRecord shards (as
tests/data/test_tfds_source.py does), a tiny random CLIP saved to disk and loaded by path
(tests/encoders/test_clip.py), and the jobs in the order the configs' docstrings give them, with
the paths the configs name (relative to a scratch working directory). The public side (ImageNet
embeddings, the U-Net) is made once with configs/coco.py and reused by configs/cifar10.py, as
the configs share runs/paper.
"""

import json
import pathlib

import numpy as np
import pytest

from dprdm_jax import cli
from dprdm_jax.privacy import ledger as ledger_lib
from tests.data import test_tfds_source as tfds_test
from tests.encoders import test_clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_CAPTIONS = ["a dog on a beach", "two cats", "a red bus", "a boat at sea", "green hills",
                 "a plate of food"]


def _picture(rng, size=40):
  """A noisy image with a random mean colour: distinct, so features are not degenerate."""
  base = rng.integers(0, 256, 3)
  return np.clip(base + rng.normal(0, 30, (size, size + 8, 3)), 0, 255).astype(np.uint8)


def _prepare(data_dir: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  tfds_test.prepare(data_dir, "imagenet2012", {
      split: [tfds_test.imagenet_example(_picture(rng), i % 3) for i in range(n)]
      for split, n in (("train", 24), ("validation", 6))})
  tfds_test.prepare(data_dir, "coco_captions", {
      split: [tfds_test.coco_example(_picture(rng), [COCO_CAPTIONS[i % 6], "second"])
              for i in range(n)]
      for split, n in (("train", 12), ("restval", 12), ("val", 8))})
  tfds_test.prepare(data_dir, "cifar10", {
      split: [{"id": f"{split}_{i}", "label": i % 10,
               "image": tfds_test.encoded(_picture(rng, 32)[:, :32], "PNG")} for i in range(n)]
      for split, n in (("train", 24), ("test", 8))})


class Runner:
  """`dprdm` jobs under one config, in a scratch working directory."""

  def __init__(self, capsys, config: str, clip: pathlib.Path, data_dir: pathlib.Path):
    self.capsys = capsys
    self.config = [f"--config={ROOT / 'configs' / config}:tiny,clip={clip}",
                   f"--config.data.tfds_dir={data_dir}"]

  def __call__(self, *words_and_flags, expect: int = 0) -> dict:
    words = [w for w in words_and_flags if not w.startswith("--")]
    flags = [f for f in words_and_flags if f.startswith("--")]
    status = cli.main(["dprdm", *words, *self.config, *flags, "--json"])
    out, err = self.capsys.readouterr()
    assert status == expect, err
    return json.loads(out) if status == 0 else err


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("real_data")
  _prepare(root / "tfds")
  (root / "clip").mkdir()
  test_clip.save_tiny_clip(root / "clip", layers=1, max_positions=48)
  return root


@pytest.mark.slow
def test_every_job_of_both_real_data_configs(setting, capsys, monkeypatch):
  monkeypatch.chdir(setting)
  coco = Runner(capsys, "coco.py", setting / "clip", setting / "tfds")
  cifar = Runner(capsys, "cifar10.py", setting / "clip", setting / "tfds")

  # The public side, once: ImageNet embedded by CLIP, the U-Net trained on it, a sample grid and
  # a release.
  plan = coco("privacy", "plan", "--sampling-rates=0.5", "--neighbors=2", "--accountant=rdp")
  assert (plan["dataset_size"], plan["epsilon"], plan["queries"]) == (24, 10.0, 10)
  public = coco("embed", "--dataset=imagenet2012", "--split=train")
  assert public["records"] == 24 and public["image_dim"] == 16
  trained = coco("train")
  assert trained["steps"] == 4
  sample = coco("sample", "--rows=3", "--per-row=2")
  assert pathlib.Path(sample["out"]).is_file()
  coco("export", "--out=release")
  assert json.loads((setting / "release" / "release.json").read_text())["image_tower"] == (
      f"clip:{setting / 'clip'}")
  index = coco("index", "build", "--store=runs/paper/embeddings/imagenet2012-train/images",
               "--out=public-index")
  assert (index["num_rows"], index["dim"]) == (24, 16)

  for run, private, split, prompt in (
      (coco, "coco_captions", "train+restval", "a dog on a beach"),
      (cifar, "cifar10", "train", "a horse, high quality photograph")):
    stores = run("embed", f"--dataset={private}", f"--split={split}")
    assert stores["records"] == 24  # Karpathy train + restval for COCO
    # A private image from the shipped release, charged to the config's own ledger.
    out = run("generate", f"--prompt={prompt}", "--repeat=2",
              "--config.generate.checkpoint=release")
    assert out["mode"] == "private" and out["generated_now"] == 2
    with ledger_lib.Ledger(setting / "runs" / private / "ledger.db") as book:
      (status,) = book.status()
    assert status.queries == 2
    run("generate", f"--prompt={prompt}", "--mode=public")
    summary = run("evaluate")
    final = {r["setting"]["mode"]: r for r in summary["final"]}
    assert set(final) == {"private", "public", "nonprivate", "none"}
    assert summary["metrics"][0][0] == "clip_score" and summary["select"] == ["fd", "lower"]
    for r in final.values():
      assert np.isfinite(r["clip_score"]) and np.isfinite(r["fd"]) and r["fd_se"] >= 0
      assert r["images"] == 2 * len(summary["prompts"])
    report = (setting / "runs" / private / "report" / "report.md").read_text()
    assert "FD (CLIP features)" in report and "CLIP score" in report
    assert str(setting / "clip") in report  # the feature network is named
    # The sweep charged its own ledger, never the deployment ledger (still 2 queries).
    with ledger_lib.Ledger(setting / "runs" / private / "ledger.db") as book:
      (status,) = book.status()
    assert status.queries == 2
  assert summary["prompts"] == ["an airplane, high quality photograph",
                                "an automobile, high quality photograph",
                                "a bird, high quality photograph"]  # CIFAR-10 test's first three


def test_offline_only_jobs_refuse_the_real_data_configs(setting, capsys):
  coco = Runner(capsys, "coco.py", setting / "clip", setting / "tfds")
  assert "encoder block is required" in coco("train-encoder", expect=2)
  assert "classifier block is required" in coco("train-classifier", expect=2)
