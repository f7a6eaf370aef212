"""The privacy budget ledger (rule R5): every query is charged, durably, before it is answered.

A ledger file holds, for each private dataset (named by the fingerprint of its embeddings), a
budget (epsilon_max, delta, accountant), the secret seed of its key streams, the next unused query
number, and every charge (sigma, q, k, count, first query number, the grant's nonce, time).
`Ledger.charge` is the only way to obtain query numbers, and therefore keys (`keys.query_keys`),
for a dataset.

Formal guarantee. `charge(fingerprint, mechanism, count)` either raises `BudgetExceededError`
without writing anything, or returns a `Grant` of `count` query numbers that no other grant of the
same ledger has held or will hold, after the charge is committed and fsynced. The composed epsilon
of all charges of a dataset, computed by its accountant at its delta, never exceeds its
epsilon_max. A process that dies at any point after `charge` returns leaves the charge spent; one
that dies before leaves nothing, and it never received keys. Concurrent processes and threads are
serialised by the database's write lock, so none double-spends and no charge is lost.

Keys are never reissued, even by a ledger file that was copied, restored from a backup, or lost
its write-ahead log (each of which can make two grants hold the same query numbers): every grant
draws a fresh 64-bit nonce from the operating system's CSPRNG, stores it with its charge, and its
keys are derived from (seed, nonce, stream, query number). Two grants share keys only if their
nonces collide (probability about G^2 / 2^65 over G grants of one seed). Query numbers are also
allocated from max(next_query, the end of every recorded charge), so a file whose counter was
rolled back alone does not reuse numbers.

Integrity. Each dataset's charges form a hash chain: a charge's `chain` is the SHA-256 of the
previous link and the charge's fields, the first link hangs off the dataset's fingerprint and
seed, and the dataset row holds the head and the chain's length. `verify` recomputes it and checks
everything else a file can get wrong (SQLite's integrity and foreign keys, disjoint query ranges
below the counter, unique nonces, the per-setting totals equal to the charges' sums, the composed
epsilon within the budget, every cached allowance within the budget), so a deleted, edited or
reordered charge, a truncated or spliced file, or a forged allowance is reported. The chain
guards against accidents and careless edits, not against someone who can write the file: they
hold the seed and can recompute it. `backup` writes a
consistent copy through SQLite's online backup API (safe while other processes charge); a restored
copy never reissues a key (the nonces above), but it forgets the charges made after the copy was
taken, so restore one only if the private set has answered nothing since.

Permissions: the file holds the secret seed, so it is created with mode 0600 (SQLite gives its
-wal and -shm side files the database file's mode), and a ledger file or side file that grants
any permission to group or others is refused on open.

Why SQLite. The guarantee needs an atomic read-check-append across processes and a durable commit
before release. SQLite gives both without a server: `BEGIN IMMEDIATE` takes the write lock before
the budget is read, so the check and the append are one transaction; WAL mode with
`synchronous=FULL` fsyncs the log on every commit, and a crash mid-transaction rolls back on the
next open. Readers (`status`) never block the writer. The file must live on a local disk: SQLite's
locks are unreliable on network file systems, so on a pod one process (or a service) owns the
ledger and the others ask it.

Cost of a charge. Every setting's allowance (the largest T the whole budget allows it alone,
`accounting.max_queries`) is computed once, outside the write lock, and cached in the file; a
count above it is refused at once. The history is read from per-setting totals kept in the
charge's own transaction, and the next query number from an index on the charges' ends, so a
charge costs the same at the millionth query as at the first. Checking a history of one setting
then compares integers; a mixed history runs the accountant on the composed history inside the
transaction (about 0.05 s with RDP, 0.3 s with PLD here), bounded by the allowance.
"""

import contextlib
import dataclasses
import hashlib
import os
import secrets
import sqlite3
import time
from typing import Optional

import jax

from dprdm_jax import errors
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import keys

_SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE datasets (
  fingerprint TEXT PRIMARY KEY,
  epsilon_budget REAL NOT NULL,
  delta REAL NOT NULL,
  accountant TEXT NOT NULL,
  seed TEXT NOT NULL,
  next_query INTEGER NOT NULL,
  created REAL NOT NULL,
  chain_head TEXT NOT NULL DEFAULT '',
  chain_length INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE charges (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  fingerprint TEXT NOT NULL REFERENCES datasets(fingerprint),
  noise_std REAL NOT NULL,
  sampling_rate REAL NOT NULL,
  num_neighbors INTEGER NOT NULL,
  count INTEGER NOT NULL,
  first_query INTEGER NOT NULL,
  time REAL NOT NULL,
  nonce TEXT NOT NULL,
  chain TEXT NOT NULL DEFAULT ''
);
CREATE INDEX charges_by_dataset ON charges (fingerprint);
CREATE INDEX charges_by_end ON charges (fingerprint, first_query + count);
CREATE TABLE totals (
  fingerprint TEXT NOT NULL REFERENCES datasets(fingerprint),
  noise_std REAL NOT NULL,
  sampling_rate REAL NOT NULL,
  num_neighbors INTEGER NOT NULL,
  count INTEGER NOT NULL,
  PRIMARY KEY (fingerprint, noise_std, sampling_rate, num_neighbors)
);
CREATE TABLE allowances (
  fingerprint TEXT NOT NULL REFERENCES datasets(fingerprint),
  noise_std REAL NOT NULL,
  sampling_rate REAL NOT NULL,
  num_neighbors INTEGER NOT NULL,
  max_queries INTEGER NOT NULL,
  PRIMARY KEY (fingerprint, noise_std, sampling_rate, num_neighbors)
);
"""
_CHARGE_FIELDS = ("noise_std", "sampling_rate", "num_neighbors", "count", "first_query", "time",
                  "nonce")


def _genesis(fingerprint: str, seed: str) -> str:
  return hashlib.sha256(f"dprdm ledger chain|{fingerprint}|{seed}".encode()).hexdigest()


def _link(previous: str, fingerprint: str, row) -> str:
  """The chain link of a charge (its fields in _CHARGE_FIELDS order) after `previous`."""
  fields = "|".join(repr(v) for v in row)
  return hashlib.sha256(f"{previous}|{fingerprint}|{fields}".encode()).hexdigest()


class LedgerError(errors.Error):
  """The ledger file is missing, corrupt, or asked something it cannot answer."""


class BudgetExceededError(LedgerError):
  """A charge would push a dataset's epsilon past its budget; nothing was charged."""


@dataclasses.dataclass(frozen=True)
class Budget:
  fingerprint: str
  epsilon_budget: float
  delta: float
  accountant: str


@dataclasses.dataclass(frozen=True)
class Grant:
  """Query numbers first_query .. first_query + count - 1 of a dataset, charged and committed."""
  fingerprint: str
  mechanism: accounting.Mechanism
  first_query: int
  count: int
  _seed: int = dataclasses.field(repr=False)
  _nonce: int = dataclasses.field(repr=False)

  def keys(self, stream: keys.Stream) -> jax.Array:
    """The (count,) keys of these queries in one stream (R3: never issued for any other grant)."""
    return keys.query_keys(self._seed, self.first_query, self.count, stream, nonce=self._nonce)


@dataclasses.dataclass(frozen=True)
class Status:
  """What a dataset has spent, at its delta, under its accountant (epsilon_spent: 0 if unused)."""
  budget: Budget
  queries: int
  epsilon_spent: float

  @property
  def epsilon_remaining(self) -> float:
    return max(0.0, self.budget.epsilon_budget - self.epsilon_spent)


class Ledger:
  """A budget ledger file. Open one per process (or per thread); all methods are transactional."""

  def __init__(self, path: str, create: bool = False, timeout_s: float = 600.0):
    """Opens the ledger at `path`; creates it only when `create` is True.

    Raises LedgerError if the file is missing (and not created), not a ledger, or corrupt.
    """
    self.path = os.fspath(path)
    if not create and not os.path.exists(self.path):
      raise LedgerError(f"no ledger file at {self.path}")
    if create:
      try:  # owner-only from the first byte; SQLite gives -wal and -shm the same mode
        # A missing folder is made owner-only too (an existing one is left as it is).
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
      except FileExistsError:
        pass
      except OSError as e:
        raise LedgerError(f"cannot create ledger {self.path}: {e}") from None
    _check_ledger_file(self.path)  # before any advice on its mode: never `chmod` another file
    _check_private(self.path)
    try:
      self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=FULL")
      self._db.execute("PRAGMA foreign_keys=ON")
      with self._transaction():
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and create and not self._db.execute(
            "SELECT name FROM sqlite_master").fetchall():
          for statement in _SCHEMA.split(";")[:-1]:
            self._db.execute(statement)
          self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
          version = _SCHEMA_VERSION
        if version == 1:  # before per-grant nonces: its grants' keys were derived with nonce 0
          self._db.execute("ALTER TABLE charges ADD COLUMN nonce TEXT NOT NULL DEFAULT '0'")
          version = 2
        if version == 2:  # before the hash chain: chain the charges as they stand
          self._migrate_to_chain()
          version = 3
        if version == 3:  # before the totals: sum the charges as they stand
          self._migrate_to_totals()
          self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
          version = _SCHEMA_VERSION
      if version != _SCHEMA_VERSION:
        raise LedgerError(f"{self.path} is not a dprdm budget ledger (schema version {version})")
      if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
        raise LedgerError(f"ledger {self.path} is corrupt (SQLite quick_check failed)")
    except sqlite3.DatabaseError as e:
      raise LedgerError(f"cannot read ledger {self.path}: {e}") from None

  def _migrate_to_chain(self) -> None:
    """Adds the chain columns and chains each dataset's charges in their order (schema 2 -> 3)."""
    self._db.execute("ALTER TABLE datasets ADD COLUMN chain_head TEXT NOT NULL DEFAULT ''")
    self._db.execute("ALTER TABLE datasets ADD COLUMN chain_length INTEGER NOT NULL DEFAULT 0")
    self._db.execute("ALTER TABLE charges ADD COLUMN chain TEXT NOT NULL DEFAULT ''")
    for fingerprint, seed in self._db.execute("SELECT fingerprint, seed FROM datasets").fetchall():
      head, rows = _genesis(fingerprint, seed), self._charge_rows(fingerprint)
      for charge_id, *row in rows:
        head = _link(head, fingerprint, row)
        self._db.execute("UPDATE charges SET chain = ? WHERE id = ?", (head, charge_id))
      self._db.execute("UPDATE datasets SET chain_head = ?, chain_length = ? WHERE fingerprint = ?",
                       (head, len(rows), fingerprint))

  def _migrate_to_totals(self) -> None:
    """Adds the per-setting totals and the index on charge ends (schema 3 -> 4)."""
    for statement in _SCHEMA.split(";")[:-1]:
      if "charges_by_end" in statement or "TABLE totals" in statement:
        self._db.execute(statement)
    self._db.execute(
        "INSERT INTO totals SELECT fingerprint, noise_std, sampling_rate, num_neighbors, "
        "SUM(count) FROM charges GROUP BY fingerprint, noise_std, sampling_rate, num_neighbors")

  def _charge_rows(self, fingerprint: str) -> list[tuple]:
    return self._db.execute(
        f"SELECT id, {', '.join(_CHARGE_FIELDS)} FROM charges WHERE fingerprint = ? ORDER BY id",
        (fingerprint,)).fetchall()

  def close(self):
    self._db.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _transaction(self, write: bool = True):
    return _Transaction(self._db, self.path, write)

  def register(self, fingerprint: str, epsilon_budget: float, delta: float,
               accountant: accounting.Accountant = "pld") -> Budget:
    """Gives a dataset its budget; idempotent, but a budget, once set, can never change.

    Raises LedgerError if the dataset is registered with a different budget, delta or accountant.
    """
    if not fingerprint:
      raise LedgerError("a dataset fingerprint must be a non-empty string")
    budget = Budget(fingerprint, accounting.check_epsilon(epsilon_budget),
                    accounting.check_delta(delta), accounting.check_accountant(accountant))
    with self._transaction():
      existing = self._budget(fingerprint)
      if existing is None:
        self._db.execute("INSERT INTO datasets (fingerprint, epsilon_budget, delta, accountant, "
                         "seed, next_query, created) VALUES (?, ?, ?, ?, ?, 0, ?)",
                         (fingerprint, budget.epsilon_budget, budget.delta, accountant,
                          str(secrets.randbits(64)), time.time()))
        return budget
    if existing != budget:
      raise LedgerError(f"dataset {fingerprint} already has the budget {existing}; a budget "
                        f"cannot be changed (asked for {budget})")
    return existing

  def _budget(self, fingerprint: str) -> Optional[Budget]:
    row = self._db.execute(
        "SELECT epsilon_budget, delta, accountant FROM datasets WHERE fingerprint = ?",
        (fingerprint,)).fetchone()
    return None if row is None else Budget(fingerprint, *row)

  def _history(self, fingerprint: str) -> dict[accounting.Mechanism, int]:
    """Queries charged per setting, from the totals `charge` keeps in the same transaction as
    each charge (summing the charges instead made every charge cost time linear in the history:
    11 ms at 20,000 charges). `verify` checks the totals against the charges."""
    rows = self._db.execute(
        "SELECT noise_std, sampling_rate, num_neighbors, count FROM totals WHERE fingerprint = ?",
        (fingerprint,))
    return {accounting.Mechanism(s, q, k): n for s, q, k, n in rows}

  def _allowance(self, budget: Budget, mechanism: accounting.Mechanism) -> int:
    """The largest number of `mechanism` queries the whole budget allows, cached in the file.

    A cache miss runs `accounting.max_queries` (seconds with PLD); `charge` fills the cache before
    it takes the write lock, so other processes go on charging meanwhile.
    """
    key = (budget.fingerprint, mechanism.noise_std, mechanism.sampling_rate,
           mechanism.num_neighbors)
    row = self._db.execute(
        "SELECT max_queries FROM allowances WHERE fingerprint = ? AND noise_std = ? AND "
        "sampling_rate = ? AND num_neighbors = ?", key).fetchone()
    if row is not None:
      return row[0]
    allowed = accounting.max_queries(mechanism, budget.epsilon_budget, budget.delta,
                                     budget.accountant)
    with self._transaction():
      self._db.execute("INSERT OR IGNORE INTO allowances VALUES (?, ?, ?, ?, ?)",
                       key + (allowed,))
    return allowed

  def charge(self, fingerprint: str, mechanism: accounting.Mechanism, count: int = 1) -> Grant:
    """Charges `count` queries of `mechanism` to a dataset and returns their query numbers.

    Call this before touching private data; release a result only after it returns.
    Raises BudgetExceededError (naming the spent and remaining epsilon) if the charge would exceed
    the budget, LedgerError if the dataset is not registered. See the module docstring for the
    formal guarantee.

    A count larger than the mechanism's allowance (the queries the whole budget allows it alone)
    is refused before the write lock is taken and without composing the refused count, so an
    absurd count (10**12) costs no more than a small one and never stalls other processes. The
    refusal's message is built after the lock is released.
    """
    count = accounting.check_queries(count)
    budget = self.budget(fingerprint)
    allowance = self._allowance(budget, mechanism)  # outside the write lock: autocommit
    if count > allowance:  # composition only adds epsilon: no history can make this fit
      raise self._refusal(budget, self._history(fingerprint), mechanism, count, allowance)
    with self._transaction():
      history = self._history(fingerprint)
      if set(history) <= {mechanism}:
        within = history.get(mechanism, 0) + count <= allowance
      else:  # count <= allowance bounds the composition's size
        within = accounting.history_epsilon(_plus(history, mechanism, count), budget.delta,
                                            budget.accountant) <= budget.epsilon_budget
      if within:
        seed, first, head, length = self._db.execute(
            "SELECT seed, MAX(next_query, COALESCE((SELECT MAX(first_query + count) FROM "
            "charges WHERE fingerprint = ?1), 0)), chain_head, chain_length FROM datasets "
            "WHERE fingerprint = ?1", (fingerprint,)).fetchone()
        if first + count > keys.MAX_QUERIES:
          raise LedgerError(f"dataset {fingerprint} has used {first:,} query numbers; {count:,} "
                            "more would pass the key space's 2**64")
        nonce = secrets.randbits(64)
        # As SQLite returns them, so that `verify` recomputes the same link.
        row = (float(mechanism.noise_std), float(mechanism.sampling_rate),
               int(mechanism.num_neighbors), int(count), int(first), time.time(), str(nonce))
        link = _link(head if length else _genesis(fingerprint, seed), fingerprint, row)
        self._db.execute(
            f"INSERT INTO charges (fingerprint, {', '.join(_CHARGE_FIELDS)}, chain) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (fingerprint, *row, link))
        self._db.execute("UPDATE datasets SET next_query = ?, chain_head = ?, chain_length = ? "
                         "WHERE fingerprint = ?", (first + count, link, length + 1, fingerprint))
        self._db.execute("INSERT INTO totals VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                         "count = count + excluded.count", (fingerprint, *row[:4]))
    if not within:  # nothing was written; the lock is released
      raise self._refusal(budget, history, mechanism, count, allowance)
    return Grant(fingerprint, mechanism, first, count, int(seed), nonce)

  def _refusal(self, budget, history, mechanism, count, allowance) -> BudgetExceededError:
    spent = self._spent(budget, history)
    setting = (f"sigma={mechanism.noise_std:g}, q={mechanism.sampling_rate:g}, "
               f"k={mechanism.num_neighbors}")
    if count > allowance:
      why = (f"the whole budget allows at most {allowance:,} queries with {setting}")
    else:
      wanted = accounting.history_epsilon(_plus(history, mechanism, count), budget.delta,
                                          budget.accountant)
      why = f"they would bring epsilon to {wanted:.4g}"
    return BudgetExceededError(
        f"refused: {count:,} more quer{'y' if count == 1 else 'ies'} with {setting}: {why}, "
        f"over the budget {budget.epsilon_budget:g} of dataset {budget.fingerprint} "
        f"(delta={budget.delta:.3g}, {budget.accountant.upper()}); spent epsilon {spent:.4g}, "
        f"remaining epsilon {max(0.0, budget.epsilon_budget - spent):.4g}")

  @staticmethod
  def _spent(budget: Budget, history) -> float:
    return accounting.history_epsilon(history, budget.delta, budget.accountant) if history else 0.0

  def budget(self, fingerprint: str) -> Budget:
    """The budget of a registered dataset (LedgerError if none)."""
    budget = self._budget(fingerprint)
    if budget is None:
      raise LedgerError(f"dataset {fingerprint} has no budget in {self.path}; register it first")
    return budget

  def status(self, fingerprint: Optional[str] = None) -> list[Status]:
    """Spent and remaining epsilon of every dataset in the ledger, or of the one named (a list of
    one; LedgerError if it is not registered). Each dataset's epsilon is composed afresh."""
    with self._transaction(write=False):
      fingerprints = ([fingerprint] if fingerprint is not None else
                      [r[0] for r in self._db.execute("SELECT fingerprint FROM datasets ORDER BY 1")])
      found = [(self.budget(f), self._history(f)) for f in fingerprints]
    return [Status(b, sum(h.values()), self._spent(b, h)) for b, h in found]

  def charges(self, fingerprint: str) -> list[tuple[accounting.Mechanism, int, int]]:
    """Every charge of a dataset in order: (mechanism, first query number, count)."""
    rows = self._db.execute(
        "SELECT noise_std, sampling_rate, num_neighbors, first_query, count FROM charges "
        "WHERE fingerprint = ? ORDER BY id", (fingerprint,))
    return [(accounting.Mechanism(s, q, k), first, n) for s, q, k, first, n in rows]


  def verify(self) -> list[str]:
    """Every inconsistency of the file, as sentences; an empty list when it is sound.

    Checks SQLite's integrity and foreign keys; per dataset, a valid budget, the hash chain of
    its charges (each link, the head and the length), valid mechanisms and counts, disjoint
    query ranges below the counter, unique nonces, the totals `charge` reads equal to the sums of
    the charges (a deleted or lowered total would let charges overspend), the composed epsilon
    within the budget, and every cached allowance within the budget (a forged allowance would let
    a single-setting history overspend). Reads only; runs the accountant once per dataset and
    allowance.
    """
    problems = [f"SQLite integrity_check: {r[0]}" for r in
                self._db.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
    problems += [f"charge or allowance row {r[1]} of {r[0]} names no registered dataset"
                 for r in self._db.execute("PRAGMA foreign_key_check").fetchall()]
    datasets = self._db.execute(
        "SELECT fingerprint, epsilon_budget, delta, accountant, seed, next_query, chain_head, "
        "chain_length FROM datasets ORDER BY fingerprint").fetchall()
    for fingerprint, eps, delta, accountant, seed, next_query, head, length in datasets:
      problems += self._verify_dataset(fingerprint, eps, delta, accountant, seed, next_query,
                                       head, length)
    return problems

  def _verify_dataset(self, fingerprint, eps, delta, accountant, seed, next_query, head,
                      length) -> list[str]:
    name = f"dataset {fingerprint}"
    try:
      budget = Budget(fingerprint, accounting.check_epsilon(eps), accounting.check_delta(delta),
                      accounting.check_accountant(accountant))
    except ValueError as e:
      return [f"{name}: its budget is invalid ({e})"]
    problems, rows = [], self._charge_rows(fingerprint)
    link = _genesis(fingerprint, seed)
    stored = dict(self._db.execute("SELECT id, chain FROM charges WHERE fingerprint = ?",
                                   (fingerprint,)).fetchall())
    for charge_id, *row in rows:
      link = _link(link, fingerprint, row)
      if stored[charge_id] != link:
        problems.append(f"{name}: charge {charge_id} does not match the hash chain (edited, "
                        "inserted or reordered)")
        break
    else:  # every link holds: the head and length tell whether charges are missing at the end
      if (link if rows else "") != head or len(rows) != length:
        problems.append(f"{name}: the chain holds {len(rows)} charges ending {link[:12]}..., "
                        f"the dataset records {length} ending {head[:12] or 'nothing'}... "
                        "(charges deleted, or the file restored or spliced from another)")
    history, spans, nonces = {}, [], set()
    for charge_id, sigma, q, k, count, first, _, nonce in rows:
      try:
        mechanism = accounting.Mechanism(sigma, q, k)
        accounting.check_queries(count)
      except ValueError as e:
        problems.append(f"{name}: charge {charge_id} is invalid ({e})")
        continue
      history[mechanism] = history.get(mechanism, 0) + count
      spans.append((first, first + count, charge_id))
      if nonce in nonces:
        problems.append(f"{name}: charge {charge_id} repeats another grant's nonce")
      nonces.add(nonce)
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
      if start < end:
        problems.append(f"{name}: charges {a} and {b} hold overlapping query numbers")
    if spans and (spans[0][0] < 0 or spans[-1][1] > next_query):
      problems.append(f"{name}: query numbers run to {spans[-1][1]:,} but the counter is at "
                      f"{next_query:,} (rolled back)")
    totals = self._history(fingerprint)
    if totals != history:
      problems.append(f"{name}: its totals ({_describe(totals)}) disagree with its charges "
                      f"({_describe(history)}); edited, or a row deleted")
    spent = self._spent(budget, history)
    if spent > budget.epsilon_budget:
      problems.append(f"{name}: the charges compose to epsilon {spent:.6g}, over its budget "
                      f"{budget.epsilon_budget:g}")
    for sigma, q, k, allowed in self._db.execute(
        "SELECT noise_std, sampling_rate, num_neighbors, max_queries FROM allowances WHERE "
        "fingerprint = ?", (fingerprint,)).fetchall():
      try:
        allowance_eps = accounting.history_epsilon({accounting.Mechanism(sigma, q, k): allowed},
                                                   budget.delta, budget.accountant)
      except ValueError as e:
        problems.append(f"{name}: the allowance of sigma={sigma:g}, q={q:g}, k={k} is invalid "
                        f"({e})")
        continue
      if allowance_eps > budget.epsilon_budget:
        problems.append(f"{name}: the cached allowance of {allowed:,} queries with sigma="
                        f"{sigma:g}, q={q:g}, k={k} spends epsilon {allowance_eps:.4g}, over the "
                        f"budget (forged or stale)")
    return problems

  def backup(self, destination) -> str:
    """Writes a consistent copy of the ledger to `destination` (SQLite's online backup API, safe
    while other processes charge), mode 0600, refusing a path that exists; returns the path.

    A restored copy never reissues a key (every grant draws a fresh nonce), but it has not seen
    the charges made after the copy: restore one only if the private set answered nothing since.
    """
    destination = os.fspath(destination)
    try:
      os.close(os.open(destination, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
      raise LedgerError(f"{destination} exists; a backup never overwrites a file") from None
    except OSError as e:
      raise LedgerError(f"cannot create the backup {destination}: {e}") from None
    try:
      target = sqlite3.connect(destination)
      try:
        self._db.backup(target)
      finally:
        target.close()
    except sqlite3.Error as e:
      os.unlink(destination)
      raise LedgerError(f"backup to {destination} failed: {e}") from None
    return destination


_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def _check_ledger_file(path: str) -> None:
  """LedgerError unless `path` is a regular file that is empty (a new ledger) or an SQLite
  database: a directory, a device or some other file given as --ledger is named as such, rather
  than opened or advised to be made owner-only."""
  if not os.path.isfile(path):
    raise LedgerError(f"{path} is not a ledger file (a directory or a special file)")
  try:
    with open(path, "rb") as f:
      header = f.read(len(_SQLITE_HEADER))
  except OSError as e:
    raise LedgerError(f"cannot read ledger {path}: {e.strerror or e}") from None
  if header and header != _SQLITE_HEADER:
    raise LedgerError(f"{path} is not a dprdm budget ledger (not an SQLite database)")


def _check_private(path: str) -> None:
  """LedgerError if the ledger or a side file of it grants any permission to group or others."""
  for name in (path, path + "-wal", path + "-shm"):
    try:
      mode = os.stat(name).st_mode
    except FileNotFoundError:
      continue
    if mode & 0o077:
      raise LedgerError(
          f"{name} has mode {mode & 0o777:04o}: a ledger holds the secret seed of its noise, so "
          f"it must be private to its owner; run `chmod 600 {name}` (and check who has copied it)")


def _describe(history: dict) -> str:
  return ", ".join(f"{n:,} queries of sigma={m.noise_std:g}, q={m.sampling_rate:g}, "
                   f"k={m.num_neighbors}" for m, n in sorted(history.items())) or "none"


def _plus(history: dict, mechanism: accounting.Mechanism, count: int) -> dict:
  """The history with `count` more queries of `mechanism`."""
  return {**history, mechanism: history.get(mechanism, 0) + count}


class _Transaction:
  """BEGIN IMMEDIATE ... COMMIT (fsynced in WAL + synchronous=FULL), ROLLBACK on any exception.

  A database error (a read-only file, a full disk, a lock held past the timeout, an I/O error)
  becomes a LedgerError after the rollback: the transaction wrote nothing, so a charge that meets
  one has returned no grant and released nothing.
  """

  def __init__(self, db: sqlite3.Connection, path: str = "the ledger", write: bool = True):
    self._db, self._path, self._write = db, path, write

  def _error(self, e: sqlite3.Error) -> LedgerError:
    if not self._write:
      return LedgerError(f"cannot read the ledger {self._path} ({e})")
    return LedgerError(f"cannot write the ledger {self._path} ({e}); nothing was charged or "
                       "released")

  def __enter__(self):
    try:
      self._db.execute("BEGIN IMMEDIATE" if self._write else "BEGIN")
    except sqlite3.Error as e:
      raise self._error(e) from None

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      try:
        self._db.execute("COMMIT")
        return False
      except sqlite3.Error as e:
        exc_type, exc = type(e), e
    with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already (SQLITE_FULL)
      self._db.execute("ROLLBACK")
    if issubclass(exc_type, sqlite3.Error):
      raise self._error(exc) from None
    return False
