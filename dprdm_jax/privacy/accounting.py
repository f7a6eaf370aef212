"""Privacy accounting for DP-RDM queries with Google's dp-accounting (rule R4).

One query with noise std sigma, sampling rate q and k neighbours is the event
`PoissonSampledDpEvent(q, GaussianDpEvent(z))` with noise multiplier z = k*sigma/2: the aggregate's
L2 sensitivity is 2/k under add-or-remove-one adjacency (rule R2, `aggregate`). T queries with the
same settings are one `SelfComposedDpEvent`; differently configured ones compose in a
`ComposedDpEvent`. Both accountants run with `NeighboringRelation.ADD_OR_REMOVE_ONE`:

- "rdp": Renyi DP over dp-accounting's default orders, converted to (epsilon, delta). Agrees with
  the DP-RDM authors' Opacus accountant (sigma=0.2, q=0.01, k=18, T=1000, delta=1e-7: 0.997).
- "pld": privacy loss distributions, pessimistic discretisation (an upper bound), tighter than RDP.
  The privacy-loss grid is fitted to the history (`pld_discretization`): its step is 1/20 of the
  spread of one query's privacy loss, so that every setting gets the same relative accuracy at
  about the same cost (within 0.025% of a grid five times finer on the eight settings of
  benchmarks/accounting.py; a fixed step of 1e-4 was 0.2% off at sigma large and T = 10**5, and
  took seconds where the fitted grid takes a tenth of one).

Formal guarantee: `epsilon` returns an upper bound on the epsilon at the given delta of the composed
history, for every record of the private dataset, provided each query satisfied R1-R3. Calibration
functions return settings whose epsilon, recomputed by `epsilon`, does not exceed the target.
"""

import collections
import contextlib
import dataclasses
import logging
import math
from typing import Iterable, Literal, Mapping, Sequence, Union

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from scipy import optimize
from scipy import special

from dprdm_jax import errors

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS = ("rdp", "pld")
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
# PLD grid points per standard deviation of one query's privacy loss (`pld_discretization`), and
# the coarser grid that calibration searches first; the step never exceeds PLD_MAX_STEP.
PLD_POINTS_PER_SPREAD = 20
PLD_COARSE_POINTS_PER_SPREAD = 4
PLD_MAX_STEP = 1e-2
# Noise multipliers the accountants are asked about (Mechanism.event), and the most queries PLD
# composes: its grid grows with T (10**8 queries take about 30 s, 10**9 exhaust the memory).
Z_MIN, Z_MAX = 1e-6, 1e6
# The central-limit estimate of the noise multiplier (`_first_guess`) is trusted as a starting
# point for PLD's calibration from this z up (within 5% of PLD's answer at z >= 0.5).
CLT_MIN_Z = 0.5
PLD_MAX_QUERIES = 10**8


def _check_finite(name: str, value: float) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise errors.InputError(f"{name} must be a finite number, got {value!r}")
  return float(value)


def check_delta(delta: float) -> float:
  delta = _check_finite("delta", delta)
  if not 0 < delta < 1:
    raise errors.InputError(f"delta must lie in (0, 1), got {delta}")
  return delta


def check_epsilon(epsilon: float) -> float:
  epsilon = _check_finite("epsilon", epsilon)
  if epsilon <= 0:
    raise errors.InputError(f"epsilon must be positive, got {epsilon}")
  return epsilon


def check_queries(num_queries: int) -> int:
  if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
    raise errors.InputError(f"the number of queries must be an integer >= 1, got {num_queries!r}")
  return num_queries


def check_sampling_rate(sampling_rate: float) -> float:
  sampling_rate = _check_finite("sampling_rate (q)", sampling_rate)
  if not 0 < sampling_rate <= 1:
    raise errors.InputError(f"sampling_rate (q) must lie in (0, 1], got {sampling_rate}")
  return sampling_rate


def check_neighbors(num_neighbors: int) -> int:
  if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
    raise errors.InputError(f"num_neighbors (k) must be an integer >= 1, got {num_neighbors!r}")
  return num_neighbors


def check_accountant(accountant: str) -> str:
  if accountant not in ACCOUNTANTS:
    raise errors.InputError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
  return accountant


@dataclasses.dataclass(frozen=True, order=True)
class Mechanism:
  """The settings of one DP-RDM query.

  Attributes:
    noise_std: sigma, standard deviation of the Gaussian noise added to the mean (>= 0).
    sampling_rate: q, the Poisson subsampling probability of each private record, in (0, 1].
    num_neighbors: k, the number of retrieved neighbours averaged (>= 1).
  """
  noise_std: float
  sampling_rate: float
  num_neighbors: int

  def __post_init__(self):
    noise_std = _check_finite("noise_std (sigma)", self.noise_std)
    if noise_std < 0:
      raise errors.InputError(f"noise_std (sigma) must be >= 0, got {noise_std}")
    check_neighbors(self.num_neighbors)
    object.__setattr__(self, "noise_std", noise_std)
    object.__setattr__(self, "sampling_rate", check_sampling_rate(self.sampling_rate))

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the mean of k clipped neighbours under add-or-remove-one: 2/k (R2)."""
    return 2.0 / self.num_neighbors

  @property
  def noise_multiplier(self) -> float:
    """z = sigma / sensitivity = k*sigma/2."""
    return self.noise_std / self.sensitivity

  def event(self) -> dp_accounting.DpEvent:
    """The DpEvent of one query.

    A noise multiplier outside [Z_MIN, Z_MAX] is accounted as 0 (below: epsilon = infinity) or
    Z_MAX (above): epsilon only falls as z grows, so both are upper bounds, and the accountants
    divide by zero or overflow beyond them (sigma = 1e-300 or 1e300).
    """
    z = self.noise_multiplier
    z = 0.0 if z < Z_MIN else min(z, Z_MAX)
    return dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                               dp_accounting.GaussianDpEvent(z))


History = Union[Mapping[Mechanism, int], Iterable[tuple[Mechanism, int]]]


def history_event(history: History) -> dp_accounting.DpEvent:
  """The composed DpEvent of a history of (mechanism, number of queries) pairs.

  Queries with equal settings are grouped into one SelfComposedDpEvent, so the order of the history
  does not matter and a long history costs one event per distinct setting.
  """
  items = history.items() if isinstance(history, Mapping) else history
  counts = collections.Counter()
  for mechanism, count in items:
    counts[mechanism] += check_queries(count)
  if not counts:
    raise errors.InputError("the history holds no queries")
  events = [dp_accounting.SelfComposedDpEvent(m.event(), n) for m, n in sorted(counts.items())]
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def _loss_spread(event: dp_accounting.DpEvent) -> float:
  """The smallest standard deviation of one query's privacy loss among the event's mechanisms.

  For a Poisson-subsampled Gaussian (rate q, noise multiplier z) the loss's spread is
  sqrt(chi^2) = q * sqrt(exp(1/z^2) - 1), the chi-squared divergence of the subsampled pair (its
  first-order size); infinite for z = 0.
  """
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return min(_loss_spread(e) for e in event.events)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return _loss_spread(event.event)
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return event.sampling_probability * _loss_spread(event.event)
  if isinstance(event, dp_accounting.GaussianDpEvent):
    z = event.noise_multiplier
    return math.inf if z == 0 or z**-2 > 700 else math.sqrt(math.expm1(z**-2))
  raise errors.InputError(f"no privacy-loss spread for {type(event).__name__}")


def pld_discretization(event: dp_accounting.DpEvent,
                       points_per_spread: int = PLD_POINTS_PER_SPREAD) -> float:
  """The PLD grid step for `event`: its smallest per-query loss spread / points_per_spread, at
  most PLD_MAX_STEP. Any step gives an upper bound on epsilon; a finer one a tighter bound."""
  return min(PLD_MAX_STEP, _loss_spread(event) / points_per_spread)


def make_accountant(accountant: Accountant, event: dp_accounting.DpEvent,
                    points_per_spread: int = PLD_POINTS_PER_SPREAD
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh dp-accounting accountant for `event` under add-or-remove-one adjacency; PLD's grid
  is `pld_discretization(event, points_per_spread)`."""
  if check_accountant(accountant) == "rdp":
    return rdp.RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
  return pld.PLDAccountant(NEIGHBORING_RELATION,
                           value_discretization_interval=pld_discretization(event,
                                                                            points_per_spread))


def _queries(event: dp_accounting.DpEvent) -> int:
  """The number of queries a (composed, self-composed) event of this module stands for."""
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return sum(_queries(e) for e in event.events)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return event.count * _queries(event.event)
  return 1


class _UnconvergedOrder(logging.Filter):
  """Drops dp-accounting's warning that the RDP of one fractional order did not converge.

  dp-accounting then leaves that order out of its minimum over orders, so epsilon is still an
  upper bound (from the others); the warning repeats for every such order of every history, and
  made 260 of the 376 lines `bash launch/local.sh demo` printed.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _without_unconverged_order_warnings():
  quiet = _UnconvergedOrder()
  logger = logging.getLogger("absl")  # dp-accounting logs through absl
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: Accountant,
            points_per_spread: int = PLD_POINTS_PER_SPREAD) -> float:
  """Epsilon of `event` at `delta` (an upper bound; `inf` when sigma = 0), by
  `make_accountant(accountant, event, points_per_spread)`.

  ValueError, naming the other accountant, where this one cannot compute it: PLD beyond
  PLD_MAX_QUERIES queries, or any history whose privacy loss the accountant cannot represent
  (its memory or floating-point range runs out).
  """
  delta = check_delta(delta)
  check_accountant(accountant)
  if accountant == "pld" and _queries(event) > PLD_MAX_QUERIES:
    raise errors.InputError(f"the PLD accountant composes at most {PLD_MAX_QUERIES:,} queries "
                            f"here, this history has {_queries(event):,}; use the RDP accountant")
  try:
    with _without_unconverged_order_warnings():
      return float(make_accountant(accountant, event, points_per_spread).compose(event)
                   .get_epsilon(delta))
  except (MemoryError, OverflowError, ZeroDivisionError, ValueError) as e:
    other = "RDP" if accountant == "pld" else "PLD"
    raise errors.InputError(f"the {accountant.upper()} accountant cannot compute this epsilon "
                            f"({type(e).__name__}: {e}); try the {other} accountant") from None


def history_epsilon(history: History, delta: float, accountant: Accountant) -> float:
  """Epsilon at `delta` of a history of (mechanism, number of queries) pairs."""
  return epsilon(history_event(history), delta, accountant)


class _Search:
  """epsilon(make_event(x)) as a function of one parameter, each point computed once (the
  bracket search and Brent's method share their evaluations), and the searches on it."""

  def __init__(self, make_event, target_epsilon: float, delta: float, accountant: Accountant,
               points_per_spread: int = PLD_POINTS_PER_SPREAD):
    self._make_event, self._target = make_event, target_epsilon
    self._delta, self._accountant, self._points = delta, accountant, points_per_spread
    self._seen = {}

  def gap(self, x) -> float:
    """epsilon at x minus the target (<= 0: x meets it)."""
    if x not in self._seen:
      self._seen[x] = epsilon(self._make_event(x), self._delta, self._accountant,
                              self._points) - self._target
    return self._seen[x]

  def meets(self, x) -> bool:
    return self.gap(x) <= 0

  def bracket(self, guess: float, increasing: bool, lowest: float, highest: float,
              factor: float = 2.0):
    """Adjacent points (good, bad) of the sequence guess * factor**i with meets(good), not
    meets(bad).

    `meets` must be monotone: true for large values if `increasing`, else for small ones. The
    search stays within [lowest, highest] (both endpoints are tried) and returns None when the
    whole range meets the target, raising InputError when none of it does.
    """
    x, ok = guess, self.meets(guess)
    while True:
      up = ok != increasing  # move towards the boundary
      y = min(highest, x * factor) if up else max(lowest, x / factor)
      if y == x:
        if ok:
          return None
        raise errors.InputError(f"no value in [{lowest:g}, {highest:g}] meets the target")
      y_ok = self.meets(y)
      if y_ok != ok:
        return (x, y) if ok else (y, x)
      x = y

  def solve(self, bracket, discrete: bool = False, relative_tolerance: float = 1e-4):
    """The point nearest the target in the bracket (good, bad), on the good side: within
    `relative_tolerance` (Brent's method, scipy's, as dp-accounting's calibration runs it), or
    exactly for an integer parameter (bisection).

    Not dp-accounting's calibration: it composes every point with one accountant, and the PLD
    grid here follows the point's event (`pld_discretization`).
    """
    good, bad = bracket
    if discrete:
      good, bad = int(good), int(bad)
      while abs(good - bad) > 1:  # bisection on integers
        middle = (good + bad) // 2
        good, bad = (middle, bad) if self.meets(middle) else (good, middle)
      return good
    tolerance = relative_tolerance * min(good, bad)
    x = optimize.brentq(self.gap, min(good, bad), max(good, bad), xtol=tolerance / 4)
    # brentq's root lies within a quarter of the tolerance of the boundary, on either side: step
    # towards the good end until the target is met (the good end itself meets it).
    toward = tolerance / 4 if good > bad else -tolerance / 4
    for _ in range(4):
      if self.meets(x):
        return x
      x = min(x + toward, good) if good > bad else max(x + toward, good)
    return good


def _first_guess(target_epsilon: float, q: float, num_queries: int, delta: float) -> float:
  """A noise multiplier near the answer, from the central limit theorem: T subsampled Gaussian
  queries are close to mu-GDP with mu = q * sqrt(T * (exp(1/z^2) - 1)) (Dong, Roth and Su), and
  mu-GDP has delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2). Within
  5% of the PLD answer on the benchmark's settings; only a starting point for the search."""
  fallback = q * math.sqrt(2 * num_queries * math.log(1 / delta)) / target_epsilon
  gdp_delta = lambda mu: (special.ndtr(-target_epsilon / mu + mu / 2) - math.exp(target_epsilon)
                          * special.ndtr(-target_epsilon / mu - mu / 2))
  try:
    mu = optimize.brentq(lambda m: gdp_delta(m) - delta, 1e-8, 1e3)
    z = 1 / math.sqrt(math.log1p(mu**2 / (q**2 * num_queries)))
  except (ValueError, OverflowError, ZeroDivisionError):
    z = fallback
  return min(2.0**20, max(1e-4, z if math.isfinite(z) else fallback))


def _single(q: float, z: float, num_queries: int) -> dp_accounting.DpEvent:
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), num_queries)


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, num_queries: int,
                               delta: float, accountant: Accountant) -> float:
  """The smallest noise multiplier z (to 1e-4 relative) with epsilon <= target for T queries.

  Independent of k: a mechanism with k neighbours then needs sigma = 2z/k. Guarantee: epsilon of
  the returned z, recomputed by `epsilon`, is at most target_epsilon.

  Both accountants start from the central-limit estimate (`_first_guess`) and bracket the answer
  in steps of 5%. PLD, whose evaluations cost more, first calibrates to 0.1% on a grid of
  PLD_COARSE_POINTS_PER_SPREAD points per spread, then brackets the fine grid's answer in steps of
  0.5% around it: about 5 fine evaluations in all. Below z = CLT_MIN_Z the estimate can be far
  too small (at epsilon = 1,000, T = 1,000, q = 0.05: 0.0074 against an answer near 0.2), and a
  PLD at such a z needs a vast grid (51 s and 17 GB for that one point), so PLD starts there from
  the RDP answer instead (an upper bound, usually a little above PLD's: about 1 s).
  """
  check_epsilon(target_epsilon)
  check_queries(num_queries)
  check_delta(delta)
  check_sampling_rate(sampling_rate)
  check_accountant(accountant)
  event = lambda z: _single(sampling_rate, z, num_queries)
  guess = _first_guess(target_epsilon, sampling_rate, num_queries, delta)
  step = 1.05
  if accountant == "pld":
    if guess < CLT_MIN_Z:
      guess = calibrate_noise_multiplier(target_epsilon, sampling_rate, num_queries, delta, "rdp")
    coarse = _Search(event, target_epsilon, delta, "pld", PLD_COARSE_POINTS_PER_SPREAD)
    bracket = coarse.bracket(guess, True, 1e-4, 2.0**20, step)
    if bracket is not None:
      guess = coarse.solve(bracket, relative_tolerance=1e-3)
    step = 1.005
  search = _Search(event, target_epsilon, delta, accountant)
  bracket = search.bracket(guess, True, 1e-4, 2.0**20, step)
  if bracket is None:
    raise errors.InputError(f"epsilon {target_epsilon} is met by a noise multiplier of 1e-4; "
                            "this target protects nothing")
  return search.solve(bracket)


def calibrate_noise_std(target_epsilon: float, sampling_rate: float, num_neighbors: int,
                        num_queries: int, delta: float, accountant: Accountant) -> float:
  """The smallest sigma such that T queries with (q, k) cost at most target_epsilon at delta."""
  check_neighbors(num_neighbors)
  z = calibrate_noise_multiplier(target_epsilon, sampling_rate, num_queries, delta, accountant)
  return 2.0 * z / num_neighbors


def max_queries(mechanism: Mechanism, target_epsilon: float, delta: float,
                accountant: Accountant, prior: History = ()) -> int:
  """The largest T such that `prior` plus T queries of `mechanism` cost at most target_epsilon.

  Returns 0 when not even one query fits. Exact: epsilon(T) <= target < epsilon(T + 1).
  """
  check_epsilon(target_epsilon)
  prior = list(prior.items() if isinstance(prior, Mapping) else prior)
  search = _Search(lambda t: history_event(prior + [(mechanism, int(t))]), target_epsilon, delta,
                   accountant)
  if not search.meets(1):
    return 0
  bracket = search.bracket(1, False, 1, 2**62, factor=2)
  if bracket is None:
    raise errors.InputError(f"more than 2**62 queries fit in epsilon {target_epsilon}; "
                            "this budget protects nothing")
  return search.solve(bracket, discrete=True)


def calibrate_sampling_rate(target_epsilon: float, noise_std: float, num_neighbors: int,
                            num_queries: int, delta: float, accountant: Accountant) -> float:
  """The largest q in (0, 1] (to 1e-4 relative) such that T queries cost <= target_epsilon."""
  check_epsilon(target_epsilon)
  search = _Search(lambda q: history_event([(Mechanism(noise_std, q, num_neighbors),
                                              num_queries)]), target_epsilon, delta, accountant)
  bracket = search.bracket(1.0, False, 1e-12, 1.0)
  if bracket is None:
    return 1.0
  return search.solve(bracket)


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One cell of the planner's grid: what T queries at (q, k) need to stay within epsilon."""
  sampling_rate: float
  num_neighbors: int
  expected_subsample: float  # q * N records in an average subsample
  noise_multiplier_rdp: float
  noise_multiplier_pld: float
  noise_std_rdp: float
  noise_std_pld: float
  noise_norm_pld: float  # expected noise L2 norm, sigma_pld * sqrt(d); the mean has norm <= 1


def plan(dataset_size: int, target_epsilon: float, num_queries: int, delta: float,
         sampling_rates: Sequence[float], neighbors: Sequence[int], embedding_dim: int,
         progress=None) -> list[PlanRow]:
  """The noise each (q, k) needs so that T queries cost at most target_epsilon at delta.

  The noise multiplier depends on (q, T, delta) only, so it is calibrated once per q and both
  accountants; sigma = 2z/k for each k.
  """
  rows = []
  for q in sampling_rates:
    z = {}
    for acc in ACCOUNTANTS:
      if progress:
        progress(f"calibrating q={q:g} with {acc.upper()}")
      z[acc] = calibrate_noise_multiplier(target_epsilon, q, num_queries, delta, acc)
    for k in map(check_neighbors, neighbors):
      sigma = {acc: 2.0 * z[acc] / k for acc in ACCOUNTANTS}
      rows.append(PlanRow(q, k, q * dataset_size, z["rdp"], z["pld"], sigma["rdp"], sigma["pld"],
                          sigma["pld"] * math.sqrt(embedding_dim)))
  return rows
