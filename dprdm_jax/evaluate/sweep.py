"""`dprdm evaluate`: the paper's comparison at a fixed budget, measured, swept and reported.

The claim measured: at a target epsilon over T queries, DP retrieval beats public-only retrieval
and approaches non-private retrieval. For the judge's prompts (judges.py: the private domain's
class captions, or captions of the private dataset's held-out split), in order:

  1. grid      private settings (k, q) at the target (epsilon, T), sigma calibrated per setting by
               the accountant (the smallest sigma meeting the target);
  2. post      lambda and the guidance scale varied around the best grid setting (both act after
               the noise, so they leave epsilon unchanged);
  3. curves    the best setting re-calibrated for each epsilon at T, and for each T at the target
               epsilon, with non-private retrieval (epsilon = infinity) beside them;
  4. final     the best setting against public-only, non-private and no retrieval, with more samples.

"Best" is the judge's: the highest class hit-rate (offline default) or the lowest FD (real data,
as in the paper). Every setting draws the same prompts with the same sample keys. Each setting's
epsilon is the accountant's for T queries of its (sigma, q, k) at delta = 1/N; it is a property of
the setting, and none of it is spent from the deployment ledger.

The samples themselves are real releases from the private set, so they are charged, to an
evaluation ledger file of their own (config.evaluate.ledger) whose composed epsilon the report
prints: that is what running this evaluation cost the private records. That ledger composes
with RDP (config.evaluate.ledger_accountant): a valid upper bound, and fast for the sweep's mix of
mechanisms, where PLD recomposes every distinct mechanism at each charge (tens of seconds each).
Choosing the best setting by its measured quality is not a private selection (the report says
so), as in the paper.

Measured per setting on the judge's features against its held-out reference set (metrics.py,
with bootstrap standard errors): Frechet distance, KID, precision / recall / density / coverage,
and the judge's own scores (class and domain hit-rates with binomial standard errors, or the CLIP
score with the standard error of its mean). A killed run resumes: each setting's images are a
`dprdm generate` output directory, which a rerun completes instead of redrawing; the measurements
are recomputed.
"""

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Optional

import ml_collections
import numpy as np

from dprdm_jax import errors
from dprdm_jax import generate as generate_lib
from dprdm_jax.evaluate import classifier as classifier_lib
from dprdm_jax.evaluate import judges
from dprdm_jax.evaluate import metrics
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import ledger as ledger_lib

@dataclasses.dataclass(frozen=True)
class Setting:
  """One way of generating: a mode and its retrieval, privacy and sampling parameters."""
  stage: str
  mode: str
  k: Optional[int] = None
  q: Optional[float] = None
  sigma: Optional[float] = None
  interpolation: float = 1.0
  guidance_scale: float = 1.0
  target_epsilon: Optional[float] = None  # what sigma was calibrated for (private only)
  num_queries: Optional[int] = None  # T, the queries epsilon is stated for

  @property
  def name(self) -> str:
    """A directory name that identifies the setting."""
    parts = [self.stage, self.mode]
    if self.mode == "private":
      parts += [f"eps{self.target_epsilon:g}", f"T{self.num_queries}", f"q{self.q:g}"]
    if self.mode != "none":
      parts.append(f"k{self.k}")
    return "-".join(parts + [f"lam{self.interpolation:g}", f"w{self.guidance_scale:g}"])

  def epsilon(self, delta: float, accountant: str) -> float:
    """The setting's epsilon for T queries at delta: the accountant's for private settings,
    infinity for non-private retrieval, 0 where no private data is used."""
    if self.mode == "nonprivate":
      return math.inf
    if self.mode != "private":
      return 0.0
    mechanism = accounting.Mechanism(self.sigma, self.q, self.k)
    return accounting.history_epsilon({mechanism: self.num_queries}, delta, accountant)

  def config(self, config: ml_collections.ConfigDict, ledger_budget: float,
             ledger_accountant: str) -> ml_collections.ConfigDict:
    """`config` with this setting's privacy and guidance, charged under the evaluation ledger's
    budget and accountant."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
      if self.mode == "private":
        c.privacy.update(noise_std=self.sigma, sampling_rate=self.q)
      if self.k is not None:
        c.privacy.num_neighbors = self.k
      c.privacy.update(interpolation=self.interpolation, epsilon_budget=ledger_budget,
                       accountant=ledger_accountant)
      c.diffusion.guidance_scale = self.guidance_scale
    return c


# The noise multiplier z does not depend on k (sigma = 2z/k), so settings that differ only in k
# share one calibration (each takes seconds with PLD).
_noise_multiplier = functools.cache(accounting.calibrate_noise_multiplier)


def private_setting(stage: str, k: int, q: float, epsilon: float, num_queries: int,
                    delta: float, accountant: str, interpolation: float,
                    guidance_scale: float) -> Setting:
  """A private setting whose sigma is the smallest that meets `epsilon` over `num_queries`
  (accounting.calibrate_noise_std)."""
  accounting.check_neighbors(k)
  sigma = 2.0 * _noise_multiplier(epsilon, q, num_queries, delta, accountant) / k
  return Setting(stage, "private", k, q, sigma, interpolation, guidance_scale, epsilon,
                 num_queries)


class Evaluation:
  """The generator and the judge (prompts, reference features, metrics) of one config."""

  def __init__(self, config: ml_collections.ConfigDict, out, progress: bool = True):
    self.config, self.e = config, config.evaluate
    self.out = pathlib.Path(out)
    self.progress = progress
    self.judge = judges.load(config)
    self.prompts = self.judge.prompts
    self.generator = generate_lib.Generator(config)
    self.reference = self.judge.reference_features
    self.reference_radius = metrics.kth_neighbour_radius(self.reference, self.e.nearest_k)
    g = config.generate
    keys = g.private_keys if config.embed.key == "caption" else g.private_values
    self.private_size = generate_lib.RetrievalSet(keys, g.private_values).size
    self.delta = (config.privacy.delta if config.privacy.delta is not None
                  else 1.0 / self.private_size)
    self.accountant = config.privacy.accountant
    self.results: dict[str, dict] = {}  # by name: a setting met twice is measured once
    self._start, self._done_images = time.monotonic(), 0

  def prompts_for(self, per_prompt: int) -> list[str]:
    return [p for p in self.prompts for _ in range(per_prompt)]

  def run(self, setting: Setting, per_prompt: int) -> dict:
    """Generates (or completes) the setting's images and measures them."""
    if setting.name in self.results:
      return self.results[setting.name]
    directory = self.out / "samples" / setting.name
    prompts = self.prompts_for(per_prompt)
    settings, images = plan_size(self.e, len(self.prompts))
    eta = ""
    if self._done_images:  # this run's pace so far, compilation and measuring included
      pace = (time.monotonic() - self._start) / self._done_images
      eta = f"; about {pace * (images - self._done_images) / 60:.0f} min left for the evaluation"
    print(f"== [{len(self.results) + 1}/{settings}] {setting.name}: {len(prompts)} images{eta}",
          file=sys.stderr, flush=True)
    generate_lib.generate(
        setting.config(self.config, self.e.ledger_budget, self.e.ledger_accountant), prompts,
        directory, setting.mode,
        ledger_path=self.e.ledger, allow_nonprivate=True, generator=self.generator,
        progress=self.progress)
    records, images = classifier_lib.read_generated(directory)
    drawn = {(r["k"], r["q"], r["sigma"], r["interpolation"], r["guidance_scale"])
             for r in records}
    if setting.mode == "private" and drawn != {(setting.k, setting.q, setting.sigma,
                                                setting.interpolation, setting.guidance_scale)}:
      raise generate_lib.GenerateError(
          f"{directory} holds images drawn with other settings {sorted(drawn)} (another delta "
          "or accountant?); remove it to draw this setting")
    result = dict(setting=dataclasses.asdict(setting), name=setting.name,
                  epsilon=setting.epsilon(self.delta, self.accountant), delta=self.delta,
                  accountant=self.accountant, directory=str(directory),
                  **self.measure([r["prompt"] for r in records], images))
    self.results[setting.name] = result
    self._done_images += len(prompts)
    return result

  def measure(self, prompts: list[str], images: np.ndarray) -> dict:
    """Every metric of generated images, each with its standard error (`_se`)."""
    e = self.e
    features = self.judge.features(images)
    out = dict(images=len(images), **self.judge.scores(prompts, images))
    reference, radius = self.reference, self.reference_radius

    def all_metrics(g):
      return dict(fd=metrics.frechet_distance(reference, g),
                  kid=metrics.kernel_distance(reference, g, e.kid_subsets, seed=self.config.seed),
                  **metrics.prdc(reference, g, e.nearest_k, radius))

    for name, (value, se) in metrics.bootstrap(all_metrics, features, e.bootstrap_rounds,
                                               self.config.seed).items():
      out[name], out[f"{name}_se"] = value, se
    return out

  def ledger_status(self) -> dict:
    """What the evaluation's own releases cost: the evaluation ledger's composed epsilon."""
    path = pathlib.Path(self.e.ledger)
    if not path.exists():
      return dict(path=str(path), queries=0, epsilon_spent=0.0)
    with ledger_lib.Ledger(path) as book:
      rows = book.status()
    return dict(path=str(path), queries=sum(r.queries for r in rows),
                epsilon_spent=max((r.epsilon_spent for r in rows), default=0.0),
                delta=self.delta, accountant=self.e.ledger_accountant, datasets=len(rows))


def plan_size(e: ml_collections.ConfigDict, prompts: int) -> tuple[int, int]:
  """How many settings and images `evaluate` draws (for the progress lines)."""
  grid = len(e.neighbors) * len(e.sampling_rates)
  post = len(e.interpolations) - 1 + len(e.guidance_scales) - 1
  curves = len(set(e.epsilons) - {e.epsilon}) + len(set(e.query_counts) - {e.num_queries}) + 1
  sweep = grid + post + curves
  return sweep + 4, prompts * (sweep * e.sweep_per_prompt + 4 * e.final_per_prompt)


def check_sizes(e: ml_collections.ConfigDict, prompts: int) -> None:
  """GenerateError for a count of config.evaluate below 1, or images per setting beyond what one
  `generate` run writes: checked before the first setting, not when the final stage reaches it
  (final_per_prompt=10**9 used to start the sweep and fail minutes later)."""
  for name in ("sweep_per_prompt", "final_per_prompt", "nearest_k", "bootstrap_rounds",
               "kid_subsets"):
    if e[name] < 1:
      raise generate_lib.GenerateError(f"config.evaluate.{name} must be >= 1, got {e[name]}")
  for name in ("sweep_per_prompt", "final_per_prompt"):
    if prompts * e[name] > generate_lib.MAX_IMAGES:
      raise generate_lib.GenerateError(
          f"config.evaluate.{name} = {e[name]:,} asks for {prompts * e[name]:,} images a setting "
          f"({prompts} prompts); one setting draws at most {generate_lib.MAX_IMAGES:,}")


def evaluate(config: ml_collections.ConfigDict, out=None, progress: bool = True) -> dict:
  """Runs the four stages (module docstring) into `out` and writes the report there."""
  from dprdm_jax.evaluate import report  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out or config.evaluate.out)
  errors.make_directory(out)
  ev = Evaluation(config, out, progress)
  e, p, w = config.evaluate, config.privacy, config.diffusion.guidance_scale
  check_sizes(e, len(ev.prompts))
  if p.interpolation not in e.interpolations or w not in e.guidance_scales:
    raise generate_lib.GenerateError(
        "config.evaluate.interpolations and guidance_scales must hold the config's own "
        f"lambda ({p.interpolation}) and guidance scale ({w})")
  fixed = dict(delta=ev.delta, accountant=ev.accountant)
  sweep = e.sweep_per_prompt

  grid = [ev.run(private_setting("grid", k, q, e.epsilon, e.num_queries,
                                 interpolation=p.interpolation, guidance_scale=w, **fixed), sweep)
          for k in e.neighbors for q in e.sampling_rates]
  best = Setting(**ev.judge.best(grid)["setting"])
  post = [ev.run(dataclasses.replace(best, stage="post", interpolation=lam), sweep)
          for lam in e.interpolations if lam != best.interpolation]
  post += [ev.run(dataclasses.replace(best, stage="post", guidance_scale=g), sweep)
           for g in e.guidance_scales if g != best.guidance_scale]
  best_result = ev.judge.best(grid + post)
  best = Setting(**best_result["setting"])

  def recalibrated(epsilon, num_queries):
    if (epsilon, num_queries) == (best.target_epsilon, best.num_queries):
      return best_result
    return ev.run(private_setting("curve", best.k, best.q, epsilon, num_queries,
                                  interpolation=best.interpolation,
                                  guidance_scale=best.guidance_scale, **fixed), sweep)

  infinity = ev.run(Setting("curve", "nonprivate", best.k, 1.0, 0.0, best.interpolation,
                            best.guidance_scale), sweep)
  by_epsilon = [recalibrated(eps, e.num_queries) for eps in e.epsilons] + [infinity]
  by_queries = [recalibrated(e.epsilon, t) for t in e.query_counts]

  final_settings = [dataclasses.replace(best, stage="final"),
                    Setting("final", "public", best.k, None, None, best.interpolation,
                            best.guidance_scale),
                    Setting("final", "nonprivate", best.k, 1.0, 0.0, best.interpolation,
                            best.guidance_scale),
                    Setting("final", "none", None, None, None, 0.0, best.guidance_scale)]
  final = [ev.run(s, e.final_per_prompt) for s in final_settings]
  summary = dict(
      target=dict(epsilon=e.epsilon, num_queries=e.num_queries, delta=ev.delta,
                  accountant=ev.accountant, adjacency=generate_lib.ADJACENCY),
      features=ev.judge.features_name, metrics=ev.judge.metrics, select=ev.judge.select,
      reference=dict(name=ev.judge.reference_name, size=len(ev.reference)),
      private_set_size=ev.private_size, prompts=ev.prompts, best=best.name,
      grid=grid, post=post, by_epsilon=by_epsilon, by_queries=by_queries, final=final,
      evaluation_ledger=ev.ledger_status(),
      deployment_ledger=str(config.generate.ledger))
  (out / "results.json").write_text(json.dumps(jsonable(summary), indent=1))
  report.write(summary, out)
  return summary


def jsonable(x):
  """x with every non-finite float written as its name ("inf"): JSON has no infinity."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x
