"""A process that spends a ledger's budget, for the multi-process ledger tests.

  python -m tests.privacy.ledger_worker charge LEDGER FINGERPRINT N
      charges N single queries.
  python -m tests.privacy.ledger_worker release LEDGER FINGERPRINT OUT BATCH
      charges batches of BATCH queries and, after each charge, releases the batch's results one by
      one: a line "query_number value" appended to OUT and fsynced. Stops when the budget refuses a
      charge, then tries three more charges and writes "refused: <error>" for each refusal.
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


if __name__ == "__main__":
  {"charge": charge, "release": release}[sys.argv[1]](*sys.argv[2:])
