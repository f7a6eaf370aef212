"""R5: the budget ledger charges durably before release, refuses overspending, and serialises
concurrent processes."""

import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import keys
from dprdm_jax.privacy import ledger as ledger_lib

MECHANISM = accounting.Mechanism(noise_std=0.5, sampling_rate=0.01, num_neighbors=8)  # z = 2
ROOT = pathlib.Path(__file__).resolve().parents[2]


def small_budget_allowance(ledger, fingerprint="fp"):
  ledger.register(fingerprint, epsilon_budget=0.3, delta=1e-5, accountant="rdp")
  return accounting.max_queries(MECHANISM, 0.3, 1e-5, "rdp")


def worker(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "tests.privacy.ledger_worker", *map(str, args)],
                          cwd=ROOT, stderr=subprocess.PIPE, text=True)


def test_grants_are_contiguous_disjoint_and_give_fresh_keys(tmp_path):
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    ledger.register("fp", 5.0, 1e-5, "rdp")
    grants = [ledger.charge("fp", MECHANISM, n) for n in (3, 1, 4)]
    assert [(g.first_query, g.count) for g in grants] == [(0, 3), (3, 1), (4, 4)]
    rows = np.concatenate([jax.random.key_data(g.keys(keys.Stream.NOISE)) for g in grants])
    assert len(np.unique(rows, axis=0)) == 8
    assert [(m, f, n) for m, f, n in ledger.charges("fp")] == [(MECHANISM, 0, 3), (MECHANISM, 3, 1),
                                                               (MECHANISM, 4, 4)]
  # A reopened ledger continues the numbering: no query number, hence no key, is reused.
  with ledger_lib.Ledger(tmp_path / "l.db") as ledger:
    assert ledger.charge("fp", MECHANISM, 2).first_query == 8


def test_budget_is_fixed_once_registered(tmp_path):
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    ledger.register("fp", 5.0, 1e-5, "pld")
    assert ledger.register("fp", 5.0, 1e-5, "pld").epsilon_budget == 5.0
    with pytest.raises(ledger_lib.LedgerError, match="cannot be changed"):
      ledger.register("fp", 6.0, 1e-5, "pld")
    with pytest.raises(ledger_lib.LedgerError, match="register it first"):
      ledger.charge("other", MECHANISM)


def test_refuses_the_query_that_would_exceed_the_budget(tmp_path):
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    allowance = small_budget_allowance(ledger)
    assert 5 < allowance < 500
    ledger.charge("fp", MECHANISM, allowance - 1)
    ledger.charge("fp", MECHANISM, 1)
    with pytest.raises(ledger_lib.BudgetExceededError) as refused:
      ledger.charge("fp", MECHANISM, 1)
    message = str(refused.value)
    assert "spent epsilon" in message and "remaining epsilon" in message
    [status] = ledger.status()
    assert status.queries == allowance  # the refused query was not written
    assert status.epsilon_spent <= 0.3 < accounting.history_epsilon({MECHANISM: allowance + 1},
                                                                    1e-5, "rdp")
    assert f"{status.epsilon_spent:.4g}" in message


def test_mixed_history_is_checked_by_composing(tmp_path):
  other = accounting.Mechanism(1.0, 0.02, 8)
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    allowance = small_budget_allowance(ledger)
    ledger.charge("fp", other, 10)
    fits = accounting.max_queries(MECHANISM, 0.3, 1e-5, "rdp", prior={other: 10})
    assert 0 < fits < allowance
    ledger.charge("fp", MECHANISM, fits)
    with pytest.raises(ledger_lib.BudgetExceededError):
      ledger.charge("fp", MECHANISM, 1)
    assert ledger.status()[0].epsilon_spent <= 0.3


def test_missing_and_corrupt_files_are_refused(tmp_path):
  with pytest.raises(ledger_lib.LedgerError, match="no ledger file"):
    ledger_lib.Ledger(tmp_path / "missing.db")
  junk = tmp_path / "junk.db"
  junk.write_bytes(b"this is not a database" * 100)
  with pytest.raises(ledger_lib.LedgerError, match="cannot read ledger"):
    ledger_lib.Ledger(junk)
  other = tmp_path / "other.db"
  sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
  with pytest.raises(ledger_lib.LedgerError, match="not a dprdm budget ledger"):
    ledger_lib.Ledger(other, create=True)


@pytest.mark.slow
def test_two_processes_charge_concurrently_without_losing_a_charge(tmp_path):
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
  procs = [worker("charge", path, "fp", 500) for _ in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read()
  with ledger_lib.Ledger(path) as ledger:
    charges = ledger.charges("fp")
    assert len(charges) == 1000
    assert sorted(first for _, first, _ in charges) == list(range(1000))
    assert ledger.status()[0].queries == 1000


def released_lines(path):
  return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_sigkill_mid_batch_leaves_no_released_result_uncharged(tmp_path):
  path, out = tmp_path / "l.db", tmp_path / "released.txt"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
  proc = worker("release", path, "fp", out, 8)
  deadline = time.time() + 300
  while len(released_lines(out)) < 13 and time.time() < deadline:  # mid-way through batch 2
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  released = [int(line.split()[0]) for line in released_lines(out)]
  assert len(released) >= 13
  with ledger_lib.Ledger(path) as ledger:
    charged = {first + i for _, first, n in ledger.charges("fp") for i in range(n)}
    assert set(released) <= charged
    # Queries charged but never released stay spent, and numbering continues past them.
    assert ledger.charge("fp", MECHANISM, 1).first_query == max(charged) + 1


@pytest.mark.slow
def test_nothing_is_released_after_the_budget_refuses(tmp_path):
  path, out = tmp_path / "l.db", tmp_path / "released.txt"
  with ledger_lib.Ledger(path, create=True) as ledger:
    allowance = small_budget_allowance(ledger)
  proc = worker("release", path, "fp", out, 1)
  assert proc.wait(timeout=300) == 0, proc.stderr.read()
  lines = released_lines(out)
  results, tail = lines[:-3], lines[-3:]
  assert [int(line.split()[0]) for line in results] == list(range(allowance))
  assert all(line.startswith("refused: ") and "remaining epsilon" in line for line in tail)
  with ledger_lib.Ledger(path) as ledger:
    assert ledger.status()[0].queries == allowance


def test_commits_are_fsynced_write_ahead_log(tmp_path):
  """A SIGKILL cannot lose a committed charge (the page cache survives it), a power cut can: the
  log must be fsynced at each commit, which SQLite does in WAL mode with synchronous=FULL (2)."""
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2
