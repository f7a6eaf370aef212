"""R5: the budget ledger charges durably before release, refuses overspending, and serialises
concurrent processes."""

import os
import pathlib
import re
import signal
import sqlite3
import stat
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


def test_an_absurd_count_is_refused_without_composing_it(tmp_path, monkeypatch):
  # Composing 10**12 queries under PLD would take minutes inside the write lock (or run out of
  # memory); the allowance refuses it first, for a fresh, a one-setting and a mixed history.
  composed = []
  history_event = accounting.history_event

  def recording(history):
    items = history.items() if isinstance(history, dict) else history
    composed.append(max(n for _, n in items))
    return history_event(history)

  monkeypatch.setattr(accounting, "history_event", recording)
  other = accounting.Mechanism(1.0, 0.02, 8)
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    allowance = small_budget_allowance(ledger)
    for before in ((), ((MECHANISM, 2),), ((other, 3),)):
      for mechanism, n in before:
        ledger.charge("fp", mechanism, n)
      composed.clear()
      with pytest.raises(ledger_lib.BudgetExceededError,
                         match=f"allows at most {allowance:,} queries") as refused:
        ledger.charge("fp", MECHANISM, 10**12)
      assert "1,000,000,000,000 more queries" in str(refused.value)
      assert "remaining epsilon" in str(refused.value)
      # Never the refused count: at most the allowance's own search, which brackets by doubling.
      assert max(composed, default=0) <= 2 * allowance
    assert ledger.status()[0].queries == 5


def test_a_new_ledger_makes_its_missing_folders_owner_only(tmp_path):
  path = tmp_path / "runs" / "default" / "ledger.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 1.0, 1e-5, "rdp")
  assert stat.S_IMODE(path.stat().st_mode) == 0o600
  assert stat.S_IMODE((tmp_path / "runs" / "default").stat().st_mode) == 0o700
  with pytest.raises(ledger_lib.LedgerError, match="no ledger file"):  # only when creating
    ledger_lib.Ledger(tmp_path / "elsewhere" / "ledger.db")
  assert not (tmp_path / "elsewhere").exists()


def test_missing_and_corrupt_files_are_refused(tmp_path):
  with pytest.raises(ledger_lib.LedgerError, match="no ledger file"):
    ledger_lib.Ledger(tmp_path / "missing.db")
  junk = tmp_path / "junk.db"
  junk.write_bytes(b"this is not a database" * 100)
  junk.chmod(0o600)
  with pytest.raises(ledger_lib.LedgerError, match="not an SQLite database"):
    ledger_lib.Ledger(junk)
  # A broken SQLite file passes the header check and is refused by SQLite itself.
  broken = tmp_path / "broken.db"
  broken.write_bytes(b"SQLite format 3\x00" + b"\xff" * 100)
  broken.chmod(0o600)
  with pytest.raises(ledger_lib.LedgerError, match="cannot read ledger"):
    ledger_lib.Ledger(broken)
  other = tmp_path / "other.db"
  sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
  other.chmod(0o600)
  with pytest.raises(ledger_lib.LedgerError, match="not a dprdm budget ledger"):
    ledger_lib.Ledger(other, create=True)


@pytest.mark.parametrize("create", [False, True])
def test_another_file_is_named_and_left_alone_not_advised_a_chmod(tmp_path, create):
  """--ledger pointing at a directory or a world-readable non-ledger file (say /etc/passwd) is
  refused as not a ledger, unchanged, and the message does not tell the operator to chmod it."""
  text = tmp_path / "passwd"
  text.write_text("root:x:0:0:root:/root:/bin/bash\n")
  text.chmod(0o644)
  for path, reason in ((text, "not an SQLite database"), (tmp_path, "not a ledger file")):
    with pytest.raises(ledger_lib.LedgerError, match=reason) as raised:
      ledger_lib.Ledger(path, create=create)
    assert "chmod" not in str(raised.value)
  assert text.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
  assert stat.S_IMODE(text.stat().st_mode) == 0o644
  assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no -wal or -shm beside it


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


def _all_keys(grants) -> np.ndarray:
  """Every (query, stream) key of the grants as rows of key data."""
  return np.concatenate([jax.random.key_data(g.keys(s)) for g in grants for s in keys.Stream])


def test_a_copied_or_rolled_back_ledger_never_reissues_a_key(tmp_path):
  # Three ways an operator makes two grants hold the same query numbers: a copy of the file used
  # beside the original, a restored backup, and a write-ahead log lost before its checkpoint.
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    grants = [ledger.charge("fp", MECHANISM, 3)]
    ledger._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # pylint: disable=protected-access
    backup = sqlite3.connect(tmp_path / "backup.db")
    ledger._db.backup(backup)  # pylint: disable=protected-access
    backup.close()
    os.chmod(tmp_path / "backup.db", 0o600)
    grants.append(ledger.charge("fp", MECHANISM, 3))
    for name in ("copy.db", "restored.db"):
      source = path if name == "copy.db" else tmp_path / "backup.db"
      (tmp_path / name).write_bytes(source.read_bytes())
      if name == "copy.db" and os.path.exists(f"{path}-wal"):
        (tmp_path / f"{name}-wal").write_bytes(pathlib.Path(f"{path}-wal").read_bytes())
        os.chmod(tmp_path / f"{name}-wal", 0o600)
      os.chmod(tmp_path / name, 0o600)
    grants.append(ledger.charge("fp", MECHANISM, 3))
    # The main file without its log: the last commits are gone, next_query with them.
    (tmp_path / "nowal.db").write_bytes(path.read_bytes())
    os.chmod(tmp_path / "nowal.db", 0o600)
  for name in ("copy.db", "restored.db", "nowal.db"):
    with ledger_lib.Ledger(tmp_path / name) as other:
      grants.append(other.charge("fp", MECHANISM, 3))
  firsts = [g.first_query for g in grants]
  assert len(set(firsts)) < len(firsts), firsts  # query numbers were handed out again ...
  rows = _all_keys(grants)
  assert len(np.unique(rows, axis=0)) == len(rows)  # ... and yet no key was


def test_query_numbers_start_after_every_recorded_charge(tmp_path):
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    ledger.charge("fp", MECHANISM, 5)
    ledger._db.execute("UPDATE datasets SET next_query = 2")  # pylint: disable=protected-access
    assert ledger.charge("fp", MECHANISM, 1).first_query == 5


def test_ledger_files_are_private_and_a_readable_ledger_is_refused(tmp_path):
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    ledger.charge("fp", MECHANISM, 1)
    side = [p for p in (path, pathlib.Path(f"{path}-wal"), pathlib.Path(f"{path}-shm"))
            if p.exists()]
    assert len(side) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in side} == {oct(0o600)}
  for mode, name in ((0o644, path), (0o640, path), (0o604, path), (0o620, path)):
    name.chmod(mode)
    with pytest.raises(ledger_lib.LedgerError, match=f"mode {mode:04o}.*chmod 600"):
      ledger_lib.Ledger(path)
  path.chmod(0o600)
  with ledger_lib.Ledger(path) as ledger:
    assert ledger.status()[0].queries == 1
    assert ledger.status("fp") == ledger.status()
    wal = pathlib.Path(f"{path}-wal")
    assert wal.exists()  # the open connection holds the log
    wal.chmod(0o644)
    with pytest.raises(ledger_lib.LedgerError, match="-wal has mode 0644"):
      ledger_lib.Ledger(path)
    with pytest.raises(ledger_lib.LedgerError, match="register it first"):
      ledger.status("another")


def test_status_never_shows_the_seed_or_a_nonce(tmp_path):
  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    grant = ledger.charge("fp", MECHANISM, 1)
    seed = ledger._db.execute("SELECT seed FROM datasets").fetchone()[0]  # pylint: disable=protected-access
    shown = repr(ledger.status()) + repr(grant) + repr(ledger.charges("fp"))
  assert seed not in shown and str(grant._nonce) not in shown  # pylint: disable=protected-access


def _sound_ledger(path):
  """A ledger with two datasets and a mixed history, its log checkpointed into the file."""
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    ledger.register("other", 5.0, 1e-6, "rdp")
    for m, n in ((MECHANISM, 3), (accounting.Mechanism(0.7, 0.02, 8), 2), (MECHANISM, 4)):
      ledger.charge("fp", m, n)
    ledger.charge("other", MECHANISM, 5)
    assert ledger.verify() == []
    ledger._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # pylint: disable=protected-access


TAMPERING = {  # what an operator or an attacker does to the file -> what verify must say
    "a middle charge deleted": ("DELETE FROM charges WHERE id = 2", "does not match the hash"),
    "the last charge deleted": ("DELETE FROM charges WHERE id = 3", "the chain holds 2 charges"),
    "a count lowered": ("UPDATE charges SET count = 1 WHERE id = 1", "does not match the hash"),
    "the counter rolled back": ("UPDATE datasets SET next_query = 2 WHERE fingerprint = 'fp'",
                                "rolled back"),
    "an allowance forged": ("UPDATE allowances SET max_queries = 10000000", "forged or stale"),
    "a nonce reused": ("UPDATE charges SET nonce = (SELECT nonce FROM charges WHERE id = 1) "
                       "WHERE id = 3", "repeats another grant's nonce"),
    "ranges overlapped": ("UPDATE charges SET first_query = 0 WHERE id = 2",
                          "overlapping query numbers"),
    "the budget lowered": ("UPDATE datasets SET epsilon_budget = 0.001 WHERE fingerprint = 'fp'",
                           "over its budget"),
    "a charge for no dataset": ("INSERT INTO charges (fingerprint, noise_std, sampling_rate, "
                                "num_neighbors, count, first_query, time, nonce) VALUES "
                                "('ghost', 0.5, 0.01, 8, 1, 0, 0, '1')",
                                "names no registered dataset"),
    "a total deleted": ("DELETE FROM totals WHERE num_neighbors = 8", "disagree with its charges"),
    "a total lowered": ("UPDATE totals SET count = 1", "disagree with its charges"),
    "a dataset's charges spliced onto another": (
        "UPDATE charges SET fingerprint = 'fp' WHERE fingerprint = 'other'",
        "does not match the hash|the chain holds"),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_verify_reports_each_tampering(tmp_path, name):
  statement, message = TAMPERING[name]
  path = tmp_path / "l.db"
  _sound_ledger(path)
  db = sqlite3.connect(path)  # foreign keys are off by default, as in the sqlite3 shell
  db.execute(statement)
  db.commit()
  db.close()
  with ledger_lib.Ledger(path) as ledger:
    problems = ledger.verify()
  assert any(re.search(message, p) for p in problems), problems


def test_verify_reports_a_truncated_file(tmp_path):
  path = tmp_path / "l.db"
  _sound_ledger(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ledger_lib.LedgerError, match="corrupt|cannot read|malformed"):
    with ledger_lib.Ledger(path) as ledger:
      assert ledger.verify()


def test_a_schema_2_ledger_is_migrated_and_chained(tmp_path):
  path = tmp_path / "l.db"
  _sound_ledger(path)
  with ledger_lib.Ledger(path) as ledger:
    before = ledger.charges("fp")
    spent = ledger.status("fp")[0]
  db = sqlite3.connect(path)  # back to schema 2: no chain columns, no totals
  for table, column in (("datasets", "chain_head"), ("datasets", "chain_length"),
                        ("charges", "chain")):
    db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
  db.execute("DROP TABLE totals")
  db.execute("DROP INDEX charges_by_end")
  db.execute("PRAGMA user_version=2")
  db.commit()
  db.close()
  with ledger_lib.Ledger(path) as ledger:
    assert ledger._db.execute("PRAGMA user_version").fetchone()[0] == 4  # pylint: disable=protected-access
    assert ledger.charges("fp") == before and ledger.verify() == []
    assert ledger.status("fp")[0] == spent  # the totals were summed from the charges
    ledger.charge("fp", MECHANISM, 1)  # the chain goes on from the migrated head
    assert ledger.verify() == []
    assert ledger.status("fp")[0].queries == spent.queries + 1


def test_a_charge_costs_the_same_however_long_the_history(tmp_path):
  """Counts SQLite's virtual-machine steps (deterministic, unlike a timing): a charge that read
  or summed the whole history would take about 30 times the steps at 3,000 charges as at 100."""
  steps = [0]

  def count():
    steps[0] += 1

  def cost(ledger):
    ledger._db.set_progress_handler(count, 1)  # pylint: disable=protected-access
    steps[0] = 0
    ledger.charge("fp", MECHANISM, 1)
    ledger._db.set_progress_handler(None, 1)  # pylint: disable=protected-access
    return steps[0]

  with ledger_lib.Ledger(tmp_path / "l.db", create=True) as ledger:
    ledger.register("fp", 1000.0, 1e-5, "rdp")
    for _ in range(100):
      ledger.charge("fp", MECHANISM, 1)
    early = cost(ledger)
    for _ in range(2900):
      ledger.charge("fp", MECHANISM, 1)
    late = cost(ledger)
  assert late < 1.5 * early, (early, late)


def test_backup_is_consistent_private_exclusive_and_never_reissues_keys(tmp_path):
  path, copy = tmp_path / "l.db", tmp_path / "backup.db"
  _sound_ledger(path)
  with ledger_lib.Ledger(path) as ledger:
    ledger.charge("fp", MECHANISM, 2)  # in the log, not yet in the main file
    assert ledger.backup(copy) == str(copy)
    assert os.stat(copy).st_mode & 0o777 == 0o600
    with pytest.raises(ledger_lib.LedgerError, match="never overwrites"):
      ledger.backup(copy)
    after = ledger.charge("fp", MECHANISM, 2)  # the original answers more after the backup
    status = ledger.status()
  with ledger_lib.Ledger(copy) as restored:
    assert restored.verify() == []
    assert [s.queries for s in restored.status()] == [s.queries - (2 if s.budget.fingerprint ==
                                                                   "fp" else 0) for s in status]
    again = restored.charge("fp", MECHANISM, 2)  # the same query numbers as `after` ...
  assert again.first_query == after.first_query
  rows = _all_keys([after, again])
  assert len(np.unique(rows, axis=0)) == len(rows)  # ... and fresh keys


def test_a_backup_into_a_missing_directory_is_refused(tmp_path):
  path = tmp_path / "l.db"
  _sound_ledger(path)
  with ledger_lib.Ledger(path) as ledger:
    with pytest.raises(ledger_lib.LedgerError, match="cannot create the backup"):
      ledger.backup(tmp_path / "no" / "such" / "dir.db")


def test_a_full_disk_refuses_the_charge_and_loses_nothing(tmp_path):
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    ledger.charge("fp", MECHANISM, 1)  # the allowance is cached: the next charge only appends
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]  # pylint: disable=protected-access
    ledger._db.execute(f"PRAGMA max_page_count={pages}")  # pylint: disable=protected-access
    for _ in range(200):  # appending charges until the "disk" (the page limit) is full
      try:
        ledger.charge("fp", MECHANISM, 1)
      except ledger_lib.LedgerError as e:
        assert "cannot write the ledger" in str(e) and "nothing was charged" in str(e)
        break
    else:
      pytest.fail("the page limit never filled")
    charged = ledger.status()[0].queries
    assert ledger.verify() == []
  with ledger_lib.Ledger(path) as ledger:  # every charge that returned a grant is there
    assert ledger.status()[0].queries == charged and ledger.verify() == []
    ledger.charge("fp", MECHANISM, 1)  # and charging goes on once there is room


def test_a_read_only_ledger_refuses_to_charge_but_reports(tmp_path):
  # SQLite's query_only makes the connection read-only whoever runs the test (chmod 0400 does
  # not stop root, and CI runs as root); it fails writes with SQLITE_READONLY, as a read-only
  # file or mount does.
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    ledger.charge("fp", MECHANISM, 2)
    ledger._db.execute("PRAGMA query_only=1")  # pylint: disable=protected-access
    with pytest.raises(ledger_lib.LedgerError, match="cannot write the ledger.*readonly.*nothing "
                       "was charged"):
      ledger.charge("fp", MECHANISM, 1)
    assert ledger.status()[0].queries == 2  # reading still works
  with ledger_lib.Ledger(path) as ledger:
    assert ledger.status()[0].queries == 2 and ledger.verify() == []


def test_a_clock_that_goes_back_changes_nothing(tmp_path, monkeypatch):
  path = tmp_path / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 10.0, 1e-5, "rdp")
    first = ledger.charge("fp", MECHANISM, 2)
    monkeypatch.setattr(ledger_lib.time, "time", lambda: 0.0)  # 1970
    second = ledger.charge("fp", MECHANISM, 2)
    assert second.first_query == first.first_query + 2 and ledger.verify() == []
    assert len(np.unique(_all_keys([first, second]), axis=0)) == 8


@pytest.mark.slow
def test_many_processes_and_random_sigkills_lose_and_reissue_nothing(tmp_path):
  from tests.privacy import ledger_load  # pylint: disable=g-import-not-at-top
  r = ledger_load.run(tmp_path, processes=8, queries=60, kills=8)
  assert r["released"] == 8 * 60 and r["kills"] == 8
  assert r["released_uncharged"] == 0 and r["numbers_released_twice"] == 0
  assert r["numbers_charged_twice"] == 0 and r["keys_released_twice"] == 0
  assert r["charged_unreleased"] <= r["kills"]  # a kill between charge and release: spent, unused
  assert r["problems"] == []
