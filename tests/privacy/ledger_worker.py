"""A process that spends a ledger's budget, for the multi-process ledger tests.

  python -m tests.privacy.ledger_worker charge LEDGER FINGERPRINT N
      charges N single queries.
  python -m tests.privacy.ledger_worker release LEDGER FINGERPRINT OUT BATCH
      charges batches of BATCH queries and, after each charge, releases the batch's results one by
      one: a line "query_number value" appended to OUT and fsynced. Stops when the budget refuses a
      charge, then tries three more charges and writes "refused: <error>" for each refusal.
  python -m tests.privacy.ledger_worker release_n LEDGER FINGERPRINT OUT N
      charges and releases single queries until OUT holds N released lines (resuming a killed
      run's file): each line is the query number and the two words of its noise key, fsynced.
"""

import os
import sys

import numpy as np

from dprdm_jax.privacy import aggregate
from dprdm_jax.privacy import keys
from dprdm_jax.privacy import ledger as ledger_lib
from tests.privacy.test_ledger import MECHANISM


def charge(path, fingerprint, n):
  with ledger_lib.Ledger(path) as ledger:
    for _ in range(int(n)):
      ledger.charge(fingerprint, MECHANISM, 1)


def release(path, fingerprint, out, batch):
  batch, d = int(batch), 8
  neighbors = np.ones((batch, MECHANISM.num_neighbors, d), np.float32)
  valid = np.ones((batch, MECHANISM.num_neighbors), bool)
  queries = np.ones((batch, d), np.float32)
  with ledger_lib.Ledger(path) as ledger, open(out, "a") as f:
    while True:
      try:
        grant = ledger.charge(fingerprint, MECHANISM, batch)
      except ledger_lib.BudgetExceededError:
        break
      context = np.asarray(aggregate.aggregate(neighbors, valid, queries,
                                               grant.keys(keys.Stream.NOISE),
                                               MECHANISM.noise_std, 1.0))
      for i in range(batch):
        f.write(f"{grant.first_query + i} {context[i, 0, 0]:.6f}\n")
        f.flush()
        os.fsync(f.fileno())
    for _ in range(3):
      try:
        ledger.charge(fingerprint, MECHANISM, 1)
        f.write("released after refusal\n")
      except ledger_lib.BudgetExceededError as e:
        f.write(f"refused: {e}\n")


def release_n(path, fingerprint, out, n):
  import jax  # pylint: disable=g-import-not-at-top
  done = len(open(out).read().splitlines()) if os.path.exists(out) else 0
  with ledger_lib.Ledger(path) as ledger, open(out, "a") as f:
    for _ in range(int(n) - done):
      grant = ledger.charge(fingerprint, MECHANISM, 1)
      words = np.asarray(jax.random.key_data(grant.keys(keys.Stream.NOISE)))[0]
      f.write(f"{grant.first_query} {words[0]} {words[1]}\n")
      f.flush()
      os.fsync(f.fileno())


if __name__ == "__main__":
  {"charge": charge, "release": release, "release_n": release_n}[sys.argv[1]](*sys.argv[2:])
