"""`dprdm evaluate` on the tiny config: each setting's epsilon is the accountant's, the report is
written with all its parts, only the evaluation ledger is charged, and a killed run resumes
without charging again what it had drawn."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from dprdm_jax.evaluate import sweep
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import ledger as ledger_lib
from tests.test_configs import load


def test_each_setting_states_the_accountants_epsilon():
  # RDP keeps this test fast; the slow test below checks PLD settings the same way.
  delta = 1 / 60_000
  s = sweep.private_setting("grid", 64, 0.05, 10.0, 1000, delta, "rdp", 1.0, 4.0)
  mechanism = accounting.Mechanism(s.sigma, 0.05, 64)
  assert s.epsilon(delta, "rdp") == accounting.history_epsilon({mechanism: 1000}, delta, "rdp")
  assert 9.9 < s.epsilon(delta, "rdp") <= 10.0  # the smallest sigma that meets the target
  assert s.sigma == accounting.calibrate_noise_std(10.0, 0.05, 64, 1000, delta, "rdp")
  # The same (q, k) needs more noise for twice the queries.
  assert sweep.private_setting("curve", 64, 0.05, 10.0, 2000, delta, "rdp", 1.0,
                               4.0).sigma > s.sigma
  assert sweep.Setting("final", "nonprivate", 64, 1.0, 0.0).epsilon(delta, "rdp") == math.inf
  assert sweep.Setting("final", "public", 64).epsilon(delta, "rdp") == 0.0
  assert s.name == "grid-private-eps10-T1000-q0.05-k64-lam1-w4"
  config = s.config(load("configs/default.py"), ledger_budget=1000.0, ledger_accountant="rdp")
  assert (config.privacy.noise_std, config.privacy.sampling_rate, config.privacy.num_neighbors,
          config.diffusion.guidance_scale, config.privacy.epsilon_budget) == (
              s.sigma, 0.05, 64, 4.0, 1000.0)


@pytest.mark.parametrize("override, message", [
    ("final_per_prompt=0", "final_per_prompt must be >= 1, got 0"),
    ("sweep_per_prompt=-2", "sweep_per_prompt must be >= 1"),
    ("bootstrap_rounds=0", "bootstrap_rounds must be >= 1"),
    ("final_per_prompt=1000000000", r"asks for 10,000,000,000 images a setting \(10 prompts\)"),
    ("sweep_per_prompt=100001", "at most 1,000,000")])
def test_sizes_are_checked_before_the_first_setting(override, message):
  e = load("configs/default.py", f"--config.evaluate.{override}").evaluate
  with pytest.raises(sweep.generate_lib.GenerateError, match=message):
    sweep.check_sizes(e, 10)
  sweep.check_sizes(load("configs/default.py").evaluate, 10)  # the default passes
  sweep.check_sizes(load("configs/default.py", "--config.evaluate.final_per_prompt=100000"
                         ).evaluate, 10)  # exactly the limit


@pytest.mark.slow
def test_evaluate_writes_the_report_resumes_after_a_kill_and_charges_only_its_ledger(
    tiny_product, tmp_path, monkeypatch):
  _, overrides = tiny_product
  config = load("configs/default.py:tiny", *overrides,
                f"--config.evaluate.ledger={tmp_path / 'eval-ledger.db'}",
                f"--config.generate.ledger={tmp_path / 'deployment-ledger.db'}")
  out = tmp_path / "report"

  # A kill after the third setting: the rerun must not draw or charge those three again.
  run, calls = sweep.Evaluation.run, []

  def dying(self, setting, per_prompt):
    if len(calls) == 3:
      raise KeyboardInterrupt
    calls.append(setting.name)
    return run(self, setting, per_prompt)

  monkeypatch.setattr(sweep.Evaluation, "run", dying)
  with pytest.raises(KeyboardInterrupt):
    sweep.evaluate(config, out, progress=False)
  monkeypatch.setattr(sweep.Evaluation, "run", run)
  summary = sweep.evaluate(config, out, progress=False)

  results = (summary["grid"] + summary["post"] + summary["by_epsilon"] + summary["by_queries"]
             + summary["final"])
  unique = {r["name"]: r for r in results}
  assert set(calls) <= set(unique)
  private = [r for r in unique.values() if r["setting"]["mode"] == "private"]
  delta = 1 / 1000
  for r in private:  # each setting's epsilon is the accountant's, at or under its target
    s = r["setting"]
    m = accounting.Mechanism(s["sigma"], s["q"], s["k"])
    assert r["epsilon"] == accounting.history_epsilon({m: s["num_queries"]}, delta, "pld")
    assert r["epsilon"] <= s["target_epsilon"]
  # Only the evaluation ledger was charged, once per private image drawn.
  assert not (tmp_path / "deployment-ledger.db").exists()
  with ledger_lib.Ledger(tmp_path / "eval-ledger.db") as book:
    (status,) = book.status()
  assert status.queries == sum(r["images"] for r in private)
  assert summary["evaluation_ledger"]["queries"] == status.queries
  assert summary["evaluation_ledger"]["epsilon_spent"] == pytest.approx(status.epsilon_spent)

  # The comparison holds the four modes, the same prompts, and every metric with its error.
  assert [r["setting"]["mode"] for r in summary["final"]] == ["private", "public", "nonprivate",
                                                             "none"]
  for r in results:
    assert r["images"] == len(summary["prompts"])  # one image per prompt in the tiny config
    for key in ("fd", "kid", "precision", "recall", "density", "coverage", "class_hit_rate"):
      assert np.isfinite(r[key]) and np.isfinite(r[f"{key}_se"])
  assert [r["setting"]["num_queries"] for r in summary["by_queries"]] == [10, 20]
  assert summary["by_epsilon"][-1]["setting"]["mode"] == "nonprivate"

  # The report and its parts.
  text = (out / "report.md").read_text()
  for part in ("## The comparison", "## Sweep at the target budget", "## Curves",
               "## Samples", "## What this evaluation spent", "PLD", "add-or-remove-one",
               "FD (classifier features)", "plots/epsilon.png", "plots/queries.png",
               f"{status.queries:,} private queries"):
    assert part in text, part
  for plot in ("epsilon", "queries"):
    assert Image.open(out / "plots" / f"{plot}.png").size[0] > 500
  grids = sorted((out / "grids").glob("*.png"))
  assert len(grids) == len(summary["prompts"]) == 10
  assert json.loads((out / "results.json").read_text())["best"] == summary["best"]
