"""The empirical audit: the real private path stays below its proved epsilon, and the audit
flags the broken variants it exists to catch (reduced trial counts; `dprdm audit` runs more)."""

import numpy as np
import pytest

from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import audit

DELTA = 1e-5


@pytest.mark.parametrize("setting", [audit.GRID[0], audit.GRID[4]], ids=["q=1", "q=0.5"])
def test_the_real_path_stays_below_its_proved_epsilon(setting):
  r = audit.audit(audit.CORRECT, setting, DELTA, trials=4000)
  assert r["epsilon_proved"] == accounting.history_epsilon({setting.mechanism: 1}, DELTA, "pld")
  assert 0 < r["epsilon_lower"] < r["epsilon_proved"]  # the attack finds something, not too much


@pytest.mark.parametrize("variant", audit.BROKEN[:3], ids=lambda v: v.name.split(" (")[0])
def test_each_broken_variant_is_flagged(variant):
  r = audit.audit(variant, variant.setting, DELTA, trials=4000)
  assert r["flagged"] and r["epsilon_lower"] > r["epsilon_proved"], r
  assert not r["r1_violated"]  # these break the noise or the clip, not R1


@pytest.mark.parametrize("variant", audit.BROKEN[3:], ids=lambda v: v.name.split(",")[0])
def test_the_r1_check_flags_what_the_bound_cannot(variant):
  assert variant.name.startswith(("exact search of the whole set", "membership decided by"))
  r = audit.audit(variant, variant.setting, DELTA, trials=4000)
  assert r["flagged"] and r["r1_violated"] and not r["above_proof"], r


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_the_r1_check_holds_for_the_real_path(q):
  assert not audit.unsampled_records_matter(audit.CORRECT, audit.Setting(0.5, q, 4), queries=16)


def test_the_one_run_audit_stays_below_the_proof():
  r = audit.one_run(audit.GRID[0], DELTA, canaries=1000)
  assert 0 <= r["epsilon_lower"] < r["epsilon_proved"]


def test_the_canary_is_the_prompts_nearest_record_and_d_is_its_neighbour():
  rows, prompt, ids = audit.tables(4, canary_norm=10.0)
  scores = rows @ prompt
  assert scores.argmax() == 0 and ids[0] == ids.min()  # nearest, and it wins every tie
  # On the direction orthogonal to D, D's records contribute nothing and the canary something.
  w = audit._orthogonal_to_d(4)  # pylint: disable=protected-access
  np.testing.assert_allclose(rows[1:] @ w, 0.0, atol=1e-6)
  assert rows[0] @ w > 0.1
  with pytest.raises(ValueError, match="fits"):
    audit.tables(17)


def test_the_cli_prints_the_audit_as_json(capsys):
  import json  # pylint: disable=g-import-not-at-top
  from dprdm_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["dprdm", "audit", "--trials", "200", "--canaries", "200", "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)["rows"]
  assert len(rows) == len(audit.GRID) + len(audit.BROKEN) + 1
  assert all(isinstance(r["flagged"], bool) for r in rows)
  # 200 trials resolve no epsilon above a proof; the R1 check does not need trials.
  assert [r["r1_violated"] for r in rows] == [False] * (len(audit.GRID) + 3) + [True, True, None]
