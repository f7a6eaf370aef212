"""The Colab notebooks, executed end to end by a real Jupyter kernel (nbclient), install cell
included: the privacy planner; the quickstart on the tiny config, training its model and building
the private store from a folder of images; and the quickstart's defaults (the shipped U-Net, the
offline private set).

Each notebook's kernel runs in a throwaway virtual environment under tmp_path that sees this
environment's site-packages through a .pth file: the pinned dependencies, ipykernel and the
offline data wheels are there, dprdm-jax is not (its editable install works through a .pth file of
its own, which a directory added by a .pth file does not run). So the install cell really
installs: the kernel's pip, offline (PIP_NO_INDEX) and without build isolation, builds a copy of
this checkout's working tree (tracked and untracked, not ignored, files; the build writes into the
tree it builds) into the throwaway environment, and this environment's editable install is left
alone. Settings are injected papermill-style, as a cell after the one tagged "parameters".
"""

import configparser
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import jupyter_client
import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

from dprdm_jax import config_lib
from dprdm_jax.data import emoji
from dprdm_jax.data import offline
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import ledger as ledger_lib
from dprdm_jax.retrieval import store as store_lib

ROOT = pathlib.Path(__file__).parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "privacy_planner.ipynb")
KERNEL = "dprdm-colab-test"
CELL_TIMEOUT_S = 900


def _copy_checkout(destination: pathlib.Path) -> pathlib.Path:
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
  for name in filter(None, listed):
    if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out
      (destination / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, destination / name)
  return destination


def _environment(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(kernel spec directory, site-packages) of a throwaway venv that sees ours via a .pth file."""
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())
  ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  (site / "dprdm-colab-test.pth").write_text("".join(f"{p}\n" for p in ours))
  # The emoji packages' files that launch/local.sh extracted into our environment, where the
  # notebook's install cell looks for them in its own (and finds them: nothing to download).
  share = venv / "share" / "dprdm-data"
  share.parent.mkdir(parents=True)
  share.symlink_to(emoji.ROOTS[0], target_is_directory=True)
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "dprdm colab test", "language": "python"}))
  return spec.parent, site


def _kernel_env() -> dict:
  # No PYTHONPATH (dprdm_jax must come from the install cell) and the kernel's own matplotlib
  # backend (inline, as in Colab).
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPLBACKEND")}
  # One CPU device, as on Colab (tests/conftest.py asks for eight fake ones).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  # pip offline; PIP_NO_BUILD_ISOLATION=0 is pip's spelling of --no-build-isolation.
  env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
  return env


def _inject(nb, **parameters):
  (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  source = "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  cell.id = "injected-parameters"
  nb.cells.insert(index + 1, cell)


def execute(name: str, root: pathlib.Path, tail: str = "", **parameters):
  """Runs colab/NAME in a throwaway kernel with `parameters` (REPO_URL: a copy of the checkout)
  and an optional last cell; returns (notebook with outputs, site-packages, the copy)."""
  kernels, site = _environment(root)
  checkout = _copy_checkout(root / "checkout")
  nb = nbformat.read(COLAB / name, as_version=4)
  _inject(nb, REPO_URL=str(checkout), **parameters)
  if tail:
    nb.cells.append(nbformat.v4.new_code_cell(tail))
  workdir = root / "cwd"
  workdir.mkdir()
  manager = jupyter_client.AsyncKernelManager(
      kernel_name=KERNEL,
      kernel_spec_manager=jupyter_client.kernelspec.KernelSpecManager(kernel_dirs=[str(kernels)]))
  client = nbclient.NotebookClient(nb, km=manager, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute(env=_kernel_env())
  return nb, site, checkout


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _installed_from(site: pathlib.Path, checkout: pathlib.Path, outputs: str) -> None:
  """The install cell built the copy into the throwaway environment; ours is untouched."""
  assert "pip install" in outputs and str(checkout) in outputs
  assert (site / "dprdm_jax" / "privacy" / "accounting.py").is_file()
  (record,) = pathlib.Path(sysconfig.get_paths()["purelib"]).glob(
      "dprdm_jax-*.dist-info/direct_url.json")
  ours = json.loads(record.read_text())
  assert ours["dir_info"] == {"editable": True}
  assert pathlib.Path(ours["url"].removeprefix("file://")) == ROOT


def _pins() -> dict[str, str]:
  parser = configparser.ConfigParser()
  parser.read(ROOT / "setup.cfg")
  lines = parser["options"]["install_requires"].split()
  return dict(line.split("==") for line in lines if "==" in line)


def _local_sh(variable: str) -> list[str]:
  (value,) = re.findall(rf'^{variable}="([^"]*)"$', (ROOT / "launch" / "local.sh").read_text(),
                        re.M)
  return value.split()


def _code(name: str) -> str:
  cells = json.loads((COLAB / name).read_text())["cells"]
  return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs_and_open_with_a_badge(name):
  nb = json.loads((COLAB / name).read_text())
  first = "".join(nb["cells"][0]["source"])
  assert nb["cells"][0]["cell_type"] == "markdown"
  assert "colab-badge.svg)](https://colab.research.google.com/github/" in first
  assert first.count(f"/blob/main/colab/{name})") == 1
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  (params,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
  assert 'REPO_URL = ""' in "".join(params["source"])


def test_install_cells_pin_what_setup_cfg_and_local_sh_pin():
  assert f'"dp-accounting=={_pins()["dp-accounting"]}"' in _code("privacy_planner.ipynb")
  quickstart = _code("quickstart.ipynb")
  assert f"DATA_WHEELS = {_local_sh('data_wheels')!r}".replace("'", '"') in quickstart
  assert f"EMOJI_DEBS = {_local_sh('emoji_debs')!r}".replace("'", '"') in quickstart


def _quickstart(tmp_path, config_arg, model, images, epsilon, k, q, prompts):
  """Runs the quickstart; checks the install, the images written and shown, sigma and the budget
  it prints against the ledger and the accountant; returns the work directory."""
  work = tmp_path / "work"
  nb, site, checkout = execute("quickstart.ipynb", tmp_path, CONFIG_ARG=config_arg, MODEL=model,
                               IMAGES=images, EPSILON=epsilon, NUM_NEIGHBORS=k, SAMPLING_RATE=q,
                               PROMPTS=prompts, WORKDIR=str(work))
  outputs = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
  _installed_from(site, checkout, outputs)
  generated = sorted((work / "generated" / "run-0").glob("*.png"))
  assert [p.name for p in generated] == [f"{i:05d}.png" for i in range(len(prompts))] + [
      "grid.png"]
  assert np.asarray(Image.open(generated[0])).shape == (32, 32)
  assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)
  # sigma calibrated to epsilon over the config's planned queries at delta = 1/N; the budget the
  # last cell prints: the ledger's, and the accountant's for the queries made.
  (store_dir,) = (work / "private").iterdir()
  n = len(store_lib.EmbeddingStore(store_dir / "images"))
  planned = config_lib.load(f"configs/default.py:{config_arg}").privacy.num_queries
  sigma = accounting.calibrate_noise_std(epsilon, q, k, planned, 1 / n, "pld")
  assert (f"sigma = {sigma:.4f} keeps {planned:,} queries within epsilon = {epsilon:g} at delta = "
          f"{1 / n:.3g} (PLD)") in outputs
  spent = accounting.history_epsilon({accounting.Mechanism(sigma, q, k): len(prompts)}, 1 / n,
                                     "pld")
  with ledger_lib.Ledger(work / "ledger.db") as book:
    (status,) = book.status()
  assert status.queries == len(prompts)
  assert status.epsilon_spent == pytest.approx(spent, rel=1e-9) and 0 < spent < epsilon
  last = _text(nb.cells[-1])
  assert (f"epsilon spent: {spent:.6f} of {epsilon:g} ({len(prompts)} queries, delta = "
          f"{1 / n:.3g}, PLD)") in last
  assert f"epsilon left: {epsilon - spent:.6f}" in last
  return work


@pytest.mark.slow
def test_quickstart_trains_a_tiny_model_and_generates_from_a_folder_of_images(tmp_path):
  # 40 Fashion-MNIST test images as 28x28 PNGs, with their class captions in captions.txt.
  images = tmp_path / "my-images"
  images.mkdir()
  reference = offline.load("fashion_mnist", "test", 28).read(np.arange(40))
  lines = []
  for i, (image, caption) in enumerate(zip(reference["image"], reference["caption"])):
    Image.fromarray(image[..., 0]).save(images / f"{i:03d}.png")
    lines.append(f"{i:03d}.png\t{caption}\n")
  (images / "captions.txt").write_text("".join(lines))
  work = _quickstart(tmp_path, "tiny", "train", str(images), 3.0, 4, 0.5,
                     ["a photo of a sneaker", "a photo of a bag", "a photo of a dress"])
  store = store_lib.EmbeddingStore(work / "private" / "my-images" / "images")
  assert len(store) == 40 and store.ids.tolist() == list(range(40))
  assert (work / "unet" / "checkpoints").is_dir()


@pytest.mark.slow
def test_quickstart_default_uses_the_shipped_model_on_the_offline_private_set(tmp_path):
  work = _quickstart(tmp_path, "", "release", "", 10.0, 64, 0.05,
                     ["a photo of a sneaker", "a photo of a bag"])
  assert len(store_lib.EmbeddingStore(work / "private" / "fashion_mnist" / "images")) == 60_000
  assert not (work / "unet").exists()


@pytest.mark.slow
def test_privacy_planner_installs_only_dp_accounting_and_the_package(tmp_path):
  heavy = "import sys; print(sorted(m for m in ('jax', 'flax', 'scann', 'tensorflow') " \
          "if m in sys.modules))"
  nb, site, checkout = execute("privacy_planner.ipynb", tmp_path, tail=heavy)
  outputs = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
  _installed_from(site, checkout, outputs)
  assert "--no-deps" in outputs
  assert _text(nb.cells[-1]).strip() == "[]"  # the planner imports no jax, flax, scann or TF
  mechanism = accounting.Mechanism(noise_std=0.2, sampling_rate=0.01, num_neighbors=18)
  eps = accounting.history_epsilon({mechanism: 1000}, delta=1e-7, accountant="rdp")
  assert f"1,000 queries: epsilon (RDP) = {eps:.4f} at delta = 1e-7" in outputs
  assert "sigma = 0.11 allows" in outputs and "q=0.1   k=64" in outputs
