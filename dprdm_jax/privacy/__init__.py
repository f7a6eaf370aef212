"""The privacy core: per-query keys, the DP aggregation kernel, accounting and the budget ledger.

Data flow of one private query: `ledger.Ledger.charge` (R5) hands out query numbers, `keys` turns
them into subsample and noise keys (R3), retrieval uses the subsample key (R1), `aggregate` turns
the neighbours into the noisy context (R2), and `accounting` composes what was spent (R4).
"""
