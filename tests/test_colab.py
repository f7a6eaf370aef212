"""The Colab notebooks' code runs against the installed package (their install cell aside)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_runs(path):
  cells = json.loads(path.read_text())["cells"]
  code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
  runnable = [c for c in code if "%pip" not in c]
  assert len(runnable) == len(code) - 1  # only the install cell is skipped
  namespace = {}
  for source in runnable:
    exec(compile(source, str(path), "exec"), namespace)
