"""`dprdm audit`: a lower bound on epsilon, measured by attacking the whole private path.

The game. A private table D and its neighbour D' = D plus one canary record (add-or-remove-one
adjacency). The prompt sits at the canary's exact location and the canary has the lowest id, so
whenever a subsample holds it, it is every query's nearest neighbour and wins every tie: the worst
case for R1. One trial answers T queries from one of the two tables with the real path
(`retrieval.device.private_knn`: a fresh Poisson subsample by the keyed PRF, exact top k;
`aggregate.aggregate`: clip, mean over k, Gaussian noise), every key fresh from
`keys.query_keys` as a ledger grant would issue them, and the attacker scores the T released
contexts. With M trials under each table, any threshold on a score is a test with a false-positive
rate (D' called on D) and a false-negative rate; an (epsilon, delta)-DP mechanism keeps
TPR <= e^epsilon FPR + delta (and the same with the roles swapped), so Clopper-Pearson bounds on
both rates give an epsilon that holds with confidence 1 - significance (Jagielski et al. 2020,
Nasr et al. 2021), computed by jax_privacy's `auditing.CanaryScoreAuditor`. Each score's threshold
is chosen on half of the trials and the bound computed on the other half (jax_privacy's `Split`),
and the best of the scores is reported with a Bonferroni factor for their number.

Scores (all linear in the contexts): the projection on the canary's direction summed over the T
queries, its maximum over queries, the largest difference between two queries (which cancels any
noise a reused key repeats), and minus the projection on the direction of the record the canary
displaces from the top k (the k-th nearest of D; it matters when unsampled records influence the
result). The table (`tables`) is built so that the canary's influence is close to the largest
the proof allows.

A correct mechanism must give epsilon_lower <= epsilon_proved (the accountant's, for the same
sigma, q, k, T at delta) up to the 5% of audits the confidence allows; `BROKEN` holds deliberately
broken variants, which the audit must flag (epsilon_lower > epsilon_proved).

Two defects are beyond any distributional audit of this size, so every variant also gets a
white-box check of rule R1 (`unsampled_records_matter`): with the same keys, records outside a
query's subsample are made perfect matches, or deleted, and the released context must not change
at all. Search of the whole set, then filtering, fails it (an unsampled perfect match displaces a
sampled record), though its extra leak is at most one more subsampled record's influence, a factor
well inside the gap between this audit's bounds and the proof; membership by position fails it (a
deletion shifts the positions, hence the coins, of later records), though with fresh keys its
output distribution equals the correct one's. The verdict says which test flagged a variant.
"""

import dataclasses
import math
import secrets
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dprdm_jax import errors
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import aggregate
from dprdm_jax.privacy import keys as keys_lib
from dprdm_jax.retrieval import device
from dprdm_jax.retrieval import subsample

DIM = 33  # the table's dimension: the prompt's and 2k records' own directions, k <= 16
CANARY_NORM = 10.0  # the outlier canary of every audit: clipping must bring it back to norm 1


@dataclasses.dataclass(frozen=True)
class Setting:
  noise_std: float
  sampling_rate: float
  num_neighbors: int
  num_queries: int = 1

  @property
  def mechanism(self) -> accounting.Mechanism:
    return accounting.Mechanism(self.noise_std, self.sampling_rate, self.num_neighbors)


def tables(k: int, canary_norm: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(D' = the canary and D, the prompt, ids): D is every row but the first.

  The canary is e_0 (times canary_norm) at the prompt e_0. D holds k near records
  -0.8 e_0 + 0.6 e_j (j = 1..k) and k backups -0.9 e_0 + 0.44 e_(k+j), all pointing away from the
  prompt: the canary then moves the mean on e_0 by (1 + 0.8) / k when it displaces the k-th near
  record, close to the sensitivity 2/k the proof allows, and the backups are what an exact search
  of a subsample falls back on when near records are not sampled. Ids are positions, so the
  canary (id 0) wins every tie.
  """
  if not 1 <= k <= (DIM - 1) // 2:
    raise errors.InputError(f"the audit table fits 1 <= k <= {(DIM - 1) // 2} neighbours, got {k}")
  rows = np.zeros((1 + 2 * k, DIM), np.float32)
  rows[0, 0] = canary_norm
  for j in range(1, k + 1):
    rows[j, 0], rows[j, j] = -0.8, 0.6
    rows[k + j, 0], rows[k + j, k + j] = -0.9, math.sqrt(1 - 0.81)
  prompt = np.zeros(DIM, np.float32)
  prompt[0] = 1.0
  return rows, prompt, np.arange(len(rows), dtype=np.uint32)


def _correct_contexts(table, queries, sub_keys, noise_keys, s: Setting):
  found = device.private_knn(table, queries, sub_keys, s.sampling_rate, s.num_neighbors)
  return aggregate.aggregate(found.embeddings, found.valid, queries, noise_keys, s.noise_std,
                             1.0)[:, 0]


def _unclipped(table, queries, sub_keys, noise_keys, s: Setting):
  found = device.private_knn(table, queries, sub_keys, s.sampling_rate, s.num_neighbors)
  mean = jnp.sum(jnp.where(found.valid[..., None], found.embeddings, 0.0), axis=1)
  noise = jax.vmap(lambda key: jax.random.normal(key, (queries.shape[1],)))(noise_keys)
  return mean / s.num_neighbors + s.noise_std * noise


def _approximate_then_filter(table, queries, sub_keys, noise_keys, s: Setting):
  """The top k of the WHOLE table, then the unsampled ones dropped."""
  scores = jnp.einsum("bd,nd->bn", queries, table.embeddings)
  top, positions = jax.lax.top_k(jnp.where(table.present, scores, -jnp.inf), s.num_neighbors)
  member = subsample.candidate_membership(sub_keys, table.ids[positions],
                                          jnp.asarray(subsample.limit(s.sampling_rate)))
  valid = member & (top > -jnp.inf)
  return aggregate.aggregate(table.embeddings[positions], valid, queries, noise_keys,
                             s.noise_std, 1.0)[:, 0]


def _position_membership(table, queries, sub_keys, noise_keys, s: Setting):
  """Membership decided by each row's position in the table, not by its record id."""
  by_position = table._replace(ids=jnp.arange(table.ids.shape[0], dtype=jnp.uint32))
  found = device.private_knn(by_position, queries, sub_keys, s.sampling_rate, s.num_neighbors)
  return aggregate.aggregate(found.embeddings, found.valid, queries, noise_keys, s.noise_std,
                             1.0)[:, 0]


def _noise_on_the_sum(table, queries, sub_keys, noise_keys, s: Setting):
  """sigma added to the sum of the k neighbours, then divided by k: the mean gets sigma / k."""
  found = device.private_knn(table, queries, sub_keys, s.sampling_rate, s.num_neighbors)
  return aggregate.aggregate(found.embeddings, found.valid, queries, noise_keys,
                             s.noise_std / s.num_neighbors, 1.0)[:, 0]


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  contexts: Callable
  setting: Optional[Setting] = None  # where the audit of a broken variant runs it
  reuse_noise_key: bool = False  # every query of a trial gets the trial's first noise key


CORRECT = Variant("correct (the real path)", _correct_contexts)
# Each broken variant at a setting where its defect shows (z = k*sigma/2 = 1 throughout).
BROKEN = (
    Variant("no clipping (an outlier canary of norm 10)", _unclipped, Setting(0.5, 0.5, 4)),
    Variant("a reused noise key (one key for both queries of a trial)", _correct_contexts,
            Setting(0.5, 0.5, 4, num_queries=2), reuse_noise_key=True),
    Variant("noise for the sum added to the mean (sigma / k on the mean)", _noise_on_the_sum,
            Setting(0.5, 1.0, 4)),
    Variant("exact search of the whole set, then filtering to the subsample",
            _approximate_then_filter, Setting(0.5, 0.5, 4)),
    Variant("membership decided by position in the table, not by id", _position_membership,
            Setting(0.5, 0.5, 4)),
)


def unsampled_records_matter(variant: Variant, s: Setting, queries: int = 8,
                             seed: int = 0) -> bool:
  """The white-box check of rule R1: True when changing or deleting records outside a query's
  subsample changes its released context, keys held fixed.

  A random table of 256 unit rows with ids that are not their positions; for each query, its
  unsampled rows are replaced by the query itself (a perfect match), and separately deleted. A
  mechanism that obeys R1 releases bit-identical contexts in all three tables.
  """
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(256, DIM)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  ids = np.sort(rng.choice(2**20, size=len(rows), replace=False)).astype(np.uint32)
  prompts = rows[rng.choice(len(rows), queries)] + 0.1 * rng.normal(size=(queries, DIM))
  prompts = (prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).astype(np.float32)
  sub_keys = keys_lib.query_keys(seed, 0, queries, keys_lib.Stream.SUBSAMPLE)
  noise_keys = keys_lib.query_keys(seed, 0, queries, keys_lib.Stream.NOISE)
  member = np.asarray(subsample.membership(sub_keys, jnp.asarray(ids),
                                           jnp.asarray(subsample.limit(s.sampling_rate))))
  release = lambda table_rows, table_ids, b: np.asarray(variant.contexts(
      device.DeviceTable.from_arrays(table_rows, table_ids), jnp.asarray(prompts[b:b + 1]),
      sub_keys[b:b + 1], noise_keys[b:b + 1], s))
  for b in range(queries):
    base, outside = release(rows, ids, b), ~member[b]
    changed = rows.copy()
    changed[outside] = prompts[b]
    if not (np.array_equal(release(changed, ids, b), base)
            and np.array_equal(release(rows[~outside], ids[~outside], b), base)):
      return True
  return False


def _orthogonal_to_d(k: int) -> np.ndarray:
  """The unit vector in the span of D' orthogonal to every record of D: on it, D's records
  contribute nothing, so only the canary and the noise move a context."""
  rows = tables(k)[0]
  basis, _ = np.linalg.qr(rows[1:].T.astype(np.float64))
  w = rows[0] - basis @ (basis.T @ rows[0])
  return w / np.linalg.norm(w)


def scores(contexts: np.ndarray, k: int) -> dict[str, np.ndarray]:
  """The attacker's scores of (M, T, d) released contexts, each higher under D' (with canary)."""
  on_canary = contexts[:, :, 0]
  out = {"sum on the canary": on_canary.sum(axis=1),
         "max on the canary": on_canary.max(axis=1),
         "minus the displaced record": -contexts[:, :, k].sum(axis=1)}
  if contexts.shape[1] > 1:  # noise a reused key repeats cancels in differences
    hidden = contexts @ _orthogonal_to_d(k)
    out["largest difference between queries, orthogonal to D"] = (hidden.max(axis=1)
                                                                   - hidden.min(axis=1))
  return out


def run_world(variant: Variant, s: Setting, with_canary: bool, trials: int,
              seed: Optional[int] = None) -> np.ndarray:
  """(trials, T, d) contexts released from D' (with_canary) or D, fresh keys for every query."""
  rows, prompt, ids = tables(s.num_neighbors, CANARY_NORM)
  if not with_canary:
    rows, ids = rows[1:], ids[1:]
  table = device.DeviceTable.from_arrays(rows, ids)
  seed = secrets.randbits(64) if seed is None else seed
  n = trials * s.num_queries
  sub_keys = keys_lib.query_keys(seed, 0, n, keys_lib.Stream.SUBSAMPLE)
  noise_keys = keys_lib.query_keys(seed, 0, n, keys_lib.Stream.NOISE)
  if variant.reuse_noise_key:
    noise_keys = jnp.repeat(noise_keys[::s.num_queries], s.num_queries)
  queries = jnp.broadcast_to(jnp.asarray(prompt), (n, DIM))
  contexts = variant.contexts(table, queries, sub_keys, noise_keys, s)
  return np.asarray(contexts, np.float64).reshape(trials, s.num_queries, DIM)


def epsilon_lower(in_contexts: np.ndarray, out_contexts: np.ndarray, k: int, delta: float,
                  significance: float = 0.05, seed: int = 0) -> tuple[float, str]:
  """(the epsilon lower bound at confidence 1 - significance, the score that gave it)."""
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  ins, outs = scores(in_contexts, k), scores(out_contexts, k)
  level = significance / len(ins)  # Bonferroni over the scores
  found = []
  for name in ins:
    auditor = auditing.CanaryScoreAuditor(ins[name], outs[name])
    found.append((auditor.epsilon_clopper_pearson(
        level, delta, one_sided=False, threshold_strategy=auditing.Split(seed=seed)), name))
  return max(found)


def audit(variant: Variant, s: Setting, delta: float, trials: int = 20_000,
          significance: float = 0.05, seed: int = 0) -> dict:
  """One audit: epsilon_lower of the variant beside epsilon_proved of the setting."""
  rng = np.random.default_rng(seed)
  with_canary = run_world(variant, s, True, trials, int(rng.integers(2**63)))
  without = run_world(variant, s, False, trials, int(rng.integers(2**63)))
  lower, score = epsilon_lower(with_canary, without, s.num_neighbors, delta, significance, seed)
  proved = accounting.history_epsilon({s.mechanism: s.num_queries}, delta, "pld")
  r1_violated = unsampled_records_matter(variant, s, seed=seed)
  return dict(variant=variant.name, noise_std=s.noise_std, sampling_rate=s.sampling_rate,
              num_neighbors=s.num_neighbors, num_queries=s.num_queries, delta=delta,
              trials=trials, significance=significance, epsilon_lower=float(lower), score=score,
              epsilon_proved=proved, above_proof=bool(lower > proved),
              r1_violated=r1_violated, flagged=bool(lower > proved or r1_violated))


def one_run(s: Setting, delta: float, canaries: int = 1000, significance: float = 0.05,
            seed: int = 0) -> dict:
  """The one-run audit (Steinke, Nasr and Jagielski 2023): `canaries` orthogonal canaries of
  norm 10, each in the private table with probability 1/2 independently, one query at each
  canary's location (T = 1 per canary), every query from the same table. Its bound is weaker
  than the two-table audit's but needs a single run of the mechanism, as a deployment would allow.
  """
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  included = rng.random(canaries) < 0.5
  rows = (CANARY_NORM * np.eye(canaries, dtype=np.float32))[included]
  ids = np.flatnonzero(included).astype(np.uint32)
  table = device.DeviceTable.from_arrays(rows, ids)
  key_seed = int(rng.integers(2**63))
  sub_keys = keys_lib.query_keys(key_seed, 0, canaries, keys_lib.Stream.SUBSAMPLE)
  noise_keys = keys_lib.query_keys(key_seed, 0, canaries, keys_lib.Stream.NOISE)
  queries = jnp.eye(canaries, dtype=jnp.float32)
  contexts = np.asarray(_correct_contexts(table, queries, sub_keys, noise_keys, s))
  score = contexts[np.arange(canaries), np.arange(canaries)]  # each context on its own canary
  auditor = auditing.CanaryScoreAuditor(score[included], score[~included])
  lower = auditor.epsilon_one_run(significance, delta)
  proved = accounting.history_epsilon({s.mechanism: 1}, delta, "pld")
  return dict(variant="correct, one run", noise_std=s.noise_std, sampling_rate=s.sampling_rate,
              num_neighbors=s.num_neighbors, num_queries=1, delta=delta, trials=canaries,
              significance=significance, epsilon_lower=float(lower), score="on each canary",
              epsilon_proved=proved, above_proof=bool(lower > proved), r1_violated=None,
              flagged=bool(lower > proved))


# The grid of `dprdm audit`: noise multipliers z = k*sigma/2 from 0.5 to 2, with and without
# subsampling; epsilon_proved spans about 0.5 to 12 at delta = 1e-5.
GRID = tuple(Setting(2 * z / k, q, k) for k in (4,) for q in (1.0, 0.5) for z in (0.5, 1.0, 2.0))


# The sizes `run_all` accepts. Fewer than 100 gives no bound worth printing; the largest keep the
# arrays in a few GB: each table holds trials x T x DIM float64 contexts per world, and the one-run
# audit three canaries x canaries float32 arrays (the canaries, their queries, their contexts),
# 3 GB at 16,000 (--trials 10**12 and --canaries 10**11 ended in a numpy allocation traceback).
MIN_SIZE, MAX_TRIALS, MAX_CANARIES = 100, 1_000_000, 16_000


def run_all(delta: float = 1e-5, trials: int = 20_000, significance: float = 0.05,
            canaries: int = 4000, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
  """The table of `dprdm audit`: the real path over GRID, each broken variant at its setting, and
  the one-run audit of the real path at the first GRID setting. InputError, before any work, for
  trials outside [MIN_SIZE, MAX_TRIALS] or canaries outside [MIN_SIZE, MAX_CANARIES]."""
  if not (MIN_SIZE <= trials <= MAX_TRIALS and MIN_SIZE <= canaries <= MAX_CANARIES):
    raise errors.InputError(f"trials must lie in [{MIN_SIZE}, {MAX_TRIALS:,}] and canaries in "
                            f"[{MIN_SIZE}, {MAX_CANARIES:,}], got {trials:,} and {canaries:,}")
  jobs = [(CORRECT, s) for s in GRID] + [(v, v.setting) for v in BROKEN]
  rows = []
  for i, (variant, s) in enumerate(jobs, start=1):
    progress(f"[{i}/{len(jobs) + 1}] {variant.name}: sigma={s.noise_std:g}, q={s.sampling_rate:g},"
             f" k={s.num_neighbors}, T={s.num_queries}, {trials:,} trials per table")
    rows.append(audit(variant, s, delta, trials, significance))
  progress(f"[{len(jobs) + 1}/{len(jobs) + 1}] the real path, one run of {canaries:,} canaries")
  rows.append(one_run(GRID[0], delta, canaries, significance))
  return rows
