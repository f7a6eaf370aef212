"""The `dprdm` command: `dprdm GROUP ACTION [--flags]`, a thin layer over the library.

Each action declares its absl flags in a fresh FlagValues, so actions never see each other's flags.
Privacy actions and `index build` also take `--config FILE[:ARG]` with `--config.a.b=y` overrides:
a privacy flag that is not given falls back to the config's privacy block, and the index takes the
config's retrieval.index parameters; every job takes `--workdir`. The project's own errors
(dprdm_jax/errors.py: bad input, missing files, a refused charge) and flag errors print one line on
stderr and exit with status 2; any other exception is a bug and keeps its traceback. JAX, ScaNN,
Flax and transformers are imported by the actions that use them, so `dprdm privacy ...` starts
without them.
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, NamedTuple, Optional

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from dprdm_jax import errors
from dprdm_jax.privacy import accounting

ADJACENCY = "add-or-remove-one record"


class UsageError(errors.Error):
  """Bad input on the command line."""


class Command(NamedTuple):
  help: str
  define: Callable[[flags.FlagValues], None]
  execute: Callable[[flags.FlagValues, Optional[ml_collections.ConfigDict]], tuple[str, dict]]
  takes_config: bool


COMMANDS: dict[tuple[str, ...], Command] = {}


def command(words: str, help_text: str, define: Callable[[flags.FlagValues], None],
            takes_config: bool = False):
  """Registers `dprdm WORDS` (one or two words: a job, or a group and an action)."""
  def register(execute):
    COMMANDS[tuple(words.split())] = Command(help_text, define, execute, takes_config)
    return execute
  return register


def _json_number(x: float):
  return x if math.isfinite(x) else str(x)


def _fmt_eps(x: float) -> str:
  return f"{x:.4f}" if math.isfinite(x) else "inf (sigma = 0 gives no privacy)"


# Flags of the privacy actions, and where each falls back to in the config's privacy block.
_PRIVACY_FLAGS = {
    "sigma": ("noise_std", flags.DEFINE_float, "noise std sigma added to the mean of k neighbours"),
    "sampling-rate": ("sampling_rate", flags.DEFINE_float, "Poisson sampling rate q, in (0, 1]"),
    "neighbors": ("num_neighbors", flags.DEFINE_integer, "neighbours k averaged per query"),
    "queries": ("num_queries", flags.DEFINE_integer, "number of queries T"),
    "epsilon": ("epsilon_budget", flags.DEFINE_float, "target epsilon"),
    "delta": ("delta", flags.DEFINE_float, "delta; default 1/N (--dataset-size)"),
    "dataset-size": ("dataset_size", flags.DEFINE_integer, "N, records in the private set"),
    "embedding-dim": ("embedding_dim", flags.DEFINE_integer, "embedding dimension d"),
}


def _define_privacy(fv: flags.FlagValues, names, accountants=("rdp", "pld"), default_acc=None):
  for name in names:
    _, define, help_text = _PRIVACY_FLAGS[name]
    define(name, None, help_text, flag_values=fv)
  flags.DEFINE_enum("accountant", default_acc, list(accountants),
                    "accountant (default: the config's, else pld)", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


def _value(fv, config, name: str, default=None):
  """A flag's value, else the config's privacy field, else `default`, else a usage error."""
  value = fv[name].value
  field = _PRIVACY_FLAGS[name][0]
  if value is None and config is not None:
    value = config.privacy[field]
  if value is None:
    value = default
  if value is None:
    raise UsageError(f"--{name} is required (or give --config with privacy.{field})")
  if isinstance(value, float) and not math.isfinite(value):
    raise UsageError(f"--{name} must be a finite number, got {value}")
  return value


def _delta(fv, config) -> tuple[float, str]:
  """delta and where it came from: given, the config's, or 1/N."""
  if fv["delta"].value is not None or (config is not None and config.privacy.delta is not None):
    return accounting.check_delta(_value(fv, config, "delta")), "given"
  if fv["dataset-size"].value is None and config is None:
    raise UsageError("give --delta, or --dataset-size N for the default delta = 1/N")
  n = _value(fv, config, "dataset-size")
  if n < 1:
    raise UsageError(f"--dataset-size must be >= 1, got {n}")
  return 1.0 / n, f"1/N, N = {n:,}"


def _accountant(fv, config) -> str:
  return fv.accountant or (config.privacy.accountant if config is not None else "pld")


def _mechanism(fv, config) -> accounting.Mechanism:
  return accounting.Mechanism(_value(fv, config, "sigma"), _value(fv, config, "sampling-rate"),
                              _value(fv, config, "neighbors"))


def _describe(m: accounting.Mechanism) -> str:
  return (f"k = {m.num_neighbors} neighbours of a q = {m.sampling_rate:g} Poisson subsample, "
          f"noise sigma = {m.noise_std:g} "
          f"(noise multiplier z = k*sigma/2 = {m.noise_multiplier:.4g})")


@command("privacy epsilon", "epsilon of T queries (RDP and PLD)",
         lambda fv: _define_privacy(fv, ["sigma", "sampling-rate", "neighbors", "queries", "delta",
                                         "dataset-size"], ("rdp", "pld", "both"), "both"),
         takes_config=True)
def _privacy_epsilon(fv, config):
  mechanism = _mechanism(fv, config)
  queries = accounting.check_queries(_value(fv, config, "queries"))
  delta, delta_source = _delta(fv, config)
  chosen = accounting.ACCOUNTANTS if fv.accountant == "both" else (fv.accountant,)
  eps = {acc: accounting.history_epsilon({mechanism: queries}, delta, acc)
         if acc in chosen else None for acc in accounting.ACCOUNTANTS}
  lines = [f"Privacy cost of T = {queries:,} queries, each with {_describe(mechanism)}.",
           f"At delta = {delta:.3g} ({delta_source}), {ADJACENCY} adjacency:"]
  lines += [f"  epsilon ({acc.upper()}) = {_fmt_eps(e)}" for acc, e in eps.items() if e is not None]
  return "\n".join(lines), {
      "epsilon_rdp": None if eps["rdp"] is None else _json_number(eps["rdp"]),
      "epsilon_pld": None if eps["pld"] is None else _json_number(eps["pld"]),
      "delta": delta, "delta_source": delta_source, "noise_multiplier": mechanism.noise_multiplier,
      "sigma": mechanism.noise_std, "sampling_rate": mechanism.sampling_rate,
      "num_neighbors": mechanism.num_neighbors, "queries": queries,
      "adjacency": "add_or_remove_one"}


def _define_calibrate(fv):
  _define_privacy(fv, ["epsilon", "sigma", "sampling-rate", "neighbors", "queries", "delta",
                       "dataset-size"])
  flags.DEFINE_enum("solve", "sigma", ["sigma", "queries", "sampling-rate"],
                    "the knob to solve for; the others are given", flag_values=fv)


@command("privacy calibrate", "the sigma (or T, or q) that meets a target epsilon",
         _define_calibrate, takes_config=True)
def _privacy_calibrate(fv, config):
  target = accounting.check_epsilon(_value(fv, config, "epsilon"))
  delta, delta_source = _delta(fv, config)
  acc = _accountant(fv, config)
  k = accounting.check_neighbors(_value(fv, config, "neighbors"))
  if fv.solve == "sigma":
    q = _value(fv, config, "sampling-rate")
    queries = _value(fv, config, "queries")
    mechanism = accounting.Mechanism(
        accounting.calibrate_noise_std(target, q, k, queries, delta, acc), q, k)
  elif fv.solve == "queries":
    mechanism = _mechanism(fv, config)
    queries = accounting.max_queries(mechanism, target, delta, acc)
  else:
    sigma = _value(fv, config, "sigma")
    queries = _value(fv, config, "queries")
    mechanism = accounting.Mechanism(
        sigma, accounting.calibrate_sampling_rate(target, sigma, k, queries, delta, acc), k)
  achieved = accounting.history_epsilon({mechanism: queries}, delta, acc) if queries else 0.0
  solved = {"sigma": f"sigma = {mechanism.noise_std:.6g}",
            "queries": f"T = {queries:,} queries at most",
            "sampling-rate": f"q = {mechanism.sampling_rate:.6g} at most"}[fv.solve]
  text = (f"{solved}\n  for epsilon <= {target:g} at delta = {delta:.3g} ({delta_source}), "
          f"{acc.upper()} accountant, {ADJACENCY} adjacency\n"
          f"  with T = {queries:,} queries, each with {_describe(mechanism)}\n"
          f"  achieved epsilon = {achieved:.4f}")
  return text, {"solve": fv.solve, "sigma": mechanism.noise_std,
                "sampling_rate": mechanism.sampling_rate, "num_neighbors": k, "queries": queries,
                "noise_multiplier": mechanism.noise_multiplier, "epsilon_target": target,
                "epsilon": achieved, "delta": delta, "delta_source": delta_source,
                "accountant": acc, "adjacency": "add_or_remove_one"}


def _define_plan(fv):
  _define_privacy(fv, ["dataset-size", "epsilon", "queries", "delta", "embedding-dim"])
  flags.DEFINE_list("neighbors", "1,2,4,8,16,32,64", "values of k", flag_values=fv)
  flags.DEFINE_list("sampling-rates", "0.001,0.01,0.1,1", "values of q", flag_values=fv)


def _numbers(fv, name, kind):
  try:
    values = [kind(v) for v in fv[name].value]
  except ValueError:
    raise UsageError(f"--{name} must be a comma-separated list of numbers") from None
  if not values:
    raise UsageError(f"--{name} is empty")
  return values


@command("privacy plan", "the noise each (k, q) needs for T queries within a target epsilon",
         _define_plan, takes_config=True)
def _privacy_plan(fv, config):
  n = _value(fv, config, "dataset-size")
  if n < 1:
    raise UsageError(f"--dataset-size must be >= 1, got {n}")
  target = accounting.check_epsilon(_value(fv, config, "epsilon"))
  queries = accounting.check_queries(_value(fv, config, "queries", default=1000))
  dim = _value(fv, config, "embedding-dim", default=512)
  delta, delta_source = _delta(fv, config)
  qs = [accounting.check_sampling_rate(q) for q in _numbers(fv, "sampling-rates", float)]
  ks = [accounting.check_neighbors(k) for k in _numbers(fv, "neighbors", int)]
  steps = iter(range(1, 2 * len(qs) + 1))
  rows = accounting.plan(n, target, queries, delta, qs, ks, dim, progress=lambda msg: print(
      f"[{next(steps)}/{2 * len(qs)}] {msg}", file=sys.stderr, flush=True))
  lines = [
      f"Noise for T = {queries:,} queries within epsilon = {target:g} at delta = {delta:.3g} "
      f"({delta_source}), {ADJACENCY} adjacency, N = {n:,}.",
      "sigma: std of the noise added to the mean of k clipped neighbours (norm <= 1); "
      "z = k*sigma/2.",
      f"sigma*sqrt(d): expected norm of that noise, d = {dim}. q*N: mean subsample size "
      "('<k': slots often empty).",
      f"{'q':>7} {'q*N':>10} {'k':>4} {'z RDP':>8} {'sigma RDP':>10} {'z PLD':>8} "
      f"{'sigma PLD':>10} {'sigma*sqrt(d)':>14}"]
  for r in rows:
    note = "  <k" if r.expected_subsample < r.num_neighbors else ""
    lines.append(f"{r.sampling_rate:>7g} {r.expected_subsample:>10,.0f} {r.num_neighbors:>4} "
                 f"{r.noise_multiplier_rdp:>8.4f} {r.noise_std_rdp:>10.5f} "
                 f"{r.noise_multiplier_pld:>8.4f} {r.noise_std_pld:>10.5f} "
                 f"{r.noise_norm_pld:>14.3f}{note}")
  return "\n".join(lines), {
      "dataset_size": n, "epsilon": target, "queries": queries, "delta": delta,
      "delta_source": delta_source, "embedding_dim": dim, "adjacency": "add_or_remove_one",
      "rows": [dataclasses.asdict(r) for r in rows]}


def _define_status(fv):
  flags.DEFINE_string("ledger", None, "path of the budget ledger file", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("budget status", "spent and remaining epsilon of each dataset in a ledger",
         _define_status)
def _budget_status(fv, config):
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  if not fv.ledger:
    raise UsageError("--ledger is required")
  with ledger_lib.Ledger(fv.ledger) as ledger:
    found = ledger.status()
  lines = [f"Ledger {fv.ledger}: {len(found)} dataset(s); epsilon at each dataset's delta, "
           f"{ADJACENCY} adjacency."]
  for s in found:
    b = s.budget
    lines.append(f"  {b.fingerprint}: {s.queries:,} queries, epsilon spent "
                 f"{s.epsilon_spent:.4f} of {b.epsilon_budget:g}, remaining "
                 f"{s.epsilon_remaining:.4f} (delta = {b.delta:.3g}, {b.accountant.upper()})")
  return "\n".join(lines), {"ledger": fv.ledger, "datasets": [
      {"fingerprint": s.budget.fingerprint, "queries": s.queries,
       "epsilon_spent": s.epsilon_spent, "epsilon_remaining": s.epsilon_remaining,
       "epsilon_budget": s.budget.epsilon_budget, "delta": s.budget.delta,
       "accountant": s.budget.accountant} for s in found]}


@command("budget verify", "check a ledger's integrity: hash chain, query ranges, budgets",
         _define_status)
def _budget_verify(fv, config):
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  if not fv.ledger:
    raise UsageError("--ledger is required")
  with ledger_lib.Ledger(fv.ledger) as ledger:
    problems = ledger.verify()
    found = ledger.status()
  if problems:
    raise ledger_lib.LedgerError(f"{fv.ledger} failed verification, {len(problems)} problem(s): "
                                 + "; ".join(problems))
  charges = sum(s.queries for s in found)
  return (f"{fv.ledger}: sound ({len(found)} dataset(s), {charges:,} queries charged; hash chain, "
          "query ranges, nonces, budgets and allowances checked)"), {
              "ledger": fv.ledger, "sound": True, "datasets": len(found), "queries": charges}


def _define_backup(fv):
  _define_status(fv)
  flags.DEFINE_string("out", None, "the backup file to write (must not exist)", flag_values=fv)


@command("budget backup", "a consistent copy of a ledger (SQLite's backup API), mode 0600",
         _define_backup)
def _budget_backup(fv, config):
  from dprdm_jax.privacy import ledger as ledger_lib  # pylint: disable=g-import-not-at-top
  if not fv.ledger or not fv.out:
    raise UsageError("--ledger and --out are required")
  with ledger_lib.Ledger(fv.ledger) as ledger:
    ledger.backup(fv.out)
  with ledger_lib.Ledger(fv.out) as copy:
    problems = copy.verify()
  if problems:
    raise ledger_lib.LedgerError(f"the backup {fv.out} failed verification: {problems[0]}")
  return (f"backup of {fv.ledger} in {fv.out} (verified). Restoring it forgets the charges made "
          "after now: restore only if the private set has answered nothing since"), {
              "ledger": fv.ledger, "backup": fv.out, "verified": True}


def _define_audit(fv):
  flags.DEFINE_integer("trials", 20_000, "trials per table (half choose the threshold, half bound)",
                       flag_values=fv)
  flags.DEFINE_integer("canaries", 4000, "canaries of the one-run audit", flag_values=fv)
  flags.DEFINE_float("delta", 1e-5, "delta of both epsilons", flag_values=fv)
  flags.DEFINE_float("significance", 0.05, "1 - confidence of each lower bound", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("audit", "empirical epsilon lower bounds of the private path and of broken variants",
         _define_audit)
def _audit(fv, config):
  from dprdm_jax.privacy import audit  # pylint: disable=g-import-not-at-top
  delta = accounting.check_delta(fv.delta)
  if not 0 < fv.significance < 0.5:
    raise UsageError(f"--significance must lie in (0, 0.5), got {fv.significance}")
  rows = audit.run_all(delta, fv.trials, fv.significance, fv.canaries,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
  lines = [f"epsilon_lower: the audit's bound at {100 * (1 - fv.significance):g}% confidence "
           f"(Clopper-Pearson, jax_privacy); epsilon_proved: PLD at delta = {delta:g}, "
           f"{ADJACENCY} adjacency; the whole private path (PRF subsample, exact top k, clip, "
           "mean, Gaussian noise) on an adversarial table",
           f"{'variant':<64} {'sigma':>6} {'q':>4} {'k':>2} {'T':>2} {'eps_lower':>9} "
           f"{'eps_proved':>10}  verdict"]
  for r in rows:
    correct = r["variant"].startswith("correct")
    by = [test for test, hit in (("eps_lower > eps_proved", r["above_proof"]),
                                 ("R1 check", r["r1_violated"])) if hit]
    verdict = (("VIOLATION" if correct else "FLAGGED") + f" by {' and '.join(by)}" if by else
               "below the proof, R1 held" if correct else "not flagged")
    if r["r1_violated"] is None:  # the one-run audit has no table to check R1 on
      verdict = verdict.replace(", R1 held", "")
    lines.append(f"{r['variant']:<64} {r['noise_std']:>6.3g} {r['sampling_rate']:>4g} "
                 f"{r['num_neighbors']:>2} {r['num_queries']:>2} {r['epsilon_lower']:>9.3f} "
                 f"{r['epsilon_proved']:>10.3f}  {verdict} (score: {r['score']})")
  lines.append("R1 check: with the same keys, records outside each query's subsample made perfect "
               "matches or deleted must leave the released context bit-identical")
  return "\n".join(lines), {"delta": delta, "trials": fv.trials, "rows": rows}


def _define_index_build(fv):
  flags.DEFINE_string("store", None, "embedding store directory to index", flag_values=fv)
  flags.DEFINE_string("from-npy", None, "a raw (N, d) float32 .npy matrix; becomes a store "
                      "with ids 0..N-1 in OUT/store", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory: the index goes to OUT/index (and the store "
                      "made from --from-npy to OUT/store)", flag_values=fv)
  flags.DEFINE_enum("mode", None, ["auto", "exact", "fast"], "exact (brute force, the only mode "
                    "private retrieval accepts), fast (tree + AH + reorder), or auto by size "
                    "(default: the config's retrieval.index.mode, else auto)", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


def _load_npy(flag: str, path: str, **kwargs) -> np.ndarray:
  """The matrix in a user's .npy file; a UsageError naming the flag when it cannot be read."""
  try:
    return np.load(path, allow_pickle=False, **kwargs)
  except (OSError, ValueError) as e:
    raise UsageError(f"--{flag} {path}: {e}") from None


def _progress(message: str):
  print(message, file=sys.stderr, flush=True)


@command("index build", "build a ScaNN index over an embedding store (or a .npy matrix)",
         _define_index_build, takes_config=True)
def _index_build(fv, config):
  from dprdm_jax.retrieval import index as index_lib  # pylint: disable=g-import-not-at-top
  from dprdm_jax.retrieval import store as store_lib  # pylint: disable=g-import-not-at-top
  if (fv.store is None) == (fv["from-npy"].value is None):
    raise UsageError("give exactly one of --store and --from-npy")
  if not fv.out:
    raise UsageError("--out is required")
  out = pathlib.Path(fv.out)
  if fv.store:
    store = store_lib.EmbeddingStore(fv.store)
  else:
    matrix = _load_npy("from-npy", fv["from-npy"].value, mmap_mode="r")
    _progress(f"writing a store of {matrix.shape} rows to {out / 'store'}")
    store = store_lib.EmbeddingStore.write(out / "store", matrix)
  settings = index_lib.index_config(len(store))
  if config is not None:
    settings.update(config.retrieval.index)
  if fv.mode is not None:
    settings.mode = fv.mode
  _progress(f"building the ScaNN index over {len(store):,} x {store.dim} ({settings.mode})")
  start = time.monotonic()
  index = index_lib.ScannIndex.build(np.asarray(store.embeddings, np.float32), store.ids, settings)
  index.save(out / "index")
  seconds = time.monotonic() - start
  text = (f"{index.mode} index of {len(store):,} records (d = {store.dim}) in {out / 'index'}, "
          f"built in {seconds:.1f} s; store fingerprint {store.fingerprint}"
          + ("" if index.is_exact else "\n  approximate: for public data and non-private "
             "baselines only; private retrieval refuses it"))
  return text, {"index": str(out / "index"), "mode": index.mode, "exact": index.is_exact,
                "num_rows": len(store), "dim": store.dim, "seconds": seconds,
                "store": str(store.directory), "fingerprint": store.fingerprint}


def _define_index_query(fv):
  flags.DEFINE_string("index", None, "index directory (or the --out of `dprdm index build`)",
                      flag_values=fv)
  flags.DEFINE_string("query-file", None, "(B, d) float32 .npy of query embeddings",
                      flag_values=fv)
  flags.DEFINE_integer("k", 10, "neighbours per query", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("index query", "non-private nearest neighbours from an index, for inspection",
         _define_index_query)
def _index_query(fv, config):
  from dprdm_jax.retrieval import index as index_lib  # pylint: disable=g-import-not-at-top
  if not fv.index or not fv["query-file"].value:
    raise UsageError("--index and --query-file are required")
  path = pathlib.Path(fv.index)
  index = index_lib.ScannIndex.load(path / "index" if (path / "index").is_dir() else path)
  queries = _load_npy("query-file", fv["query-file"].value)
  ids, scores = index.search(queries, fv.k)
  lines = [f"{index.mode} search, k = {fv.k}, inner-product scores (not private: no subsample, "
           "no noise, no budget)"]
  for b, (row_ids, row_scores) in enumerate(zip(ids, scores)):
    lines.append(f"  query {b}: " + ", ".join(
        f"{i} ({s:.4f})" for i, s in zip(row_ids, row_scores) if i >= 0))
  return "\n".join(lines), {
      "mode": index.mode, "k": fv.k, "ids": ids.tolist(),
      "scores": [[float(s) if np.isfinite(s) else None for s in row] for row in scores]}


def _define_train_encoder(fv):
  flags.DEFINE_string("workdir", None, "work directory (default: the config's encoder.workdir); "
                      "a rerun resumes from its last checkpoint", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


def _need_config(config, name: str) -> ml_collections.ConfigDict:
  if config is None or name not in config:
    raise UsageError(f"--config with a {name} block is required (e.g. configs/default.py)")
  return config


@command("train-encoder", "fit the image towers on the public data", _define_train_encoder,
         takes_config=True)
def _train_encoder(fv, config):
  from dprdm_jax import train_encoder  # pylint: disable=g-import-not-at-top
  config = _need_config(config, "encoder")
  workdir = fv.workdir or config.encoder.workdir
  figures = train_encoder.train(config, workdir)
  k = config.encoder.eval_neighbors
  text = "\n".join([
      f"image tower in {workdir} ({config.encoder.steps} steps on {config.data.public}/train)",
      f"  zero-shot class accuracy, public test split:   "
      f"{figures['zero_shot_accuracy_public_test']:.4f} (chance {figures['chance']['public']:.3f})",
      f"  zero-shot class accuracy, Fashion-MNIST test:  "
      f"{figures['zero_shot_accuracy_fashion_mnist_test']:.4f} "
      f"(chance {figures['chance']['fashion_mnist']:.3f}; a domain the tower never saw)",
      f"  retrieval accuracy (share of the top {k} Fashion-MNIST train records of each class "
      f"prompt that have its class; exact search, no subsample):",
      f"    contrastive image keys {figures[f'retrieval_accuracy_image_keys_top{k}']:.4f}",
      f"    linear image keys      "
      f"{figures[f'retrieval_accuracy_linear_image_keys_top{k}']:.4f}",
      f"    caption keys           {figures[f'retrieval_accuracy_caption_keys_top{k}']:.4f}",
      f"linear tower (value embedding, d = {config.encoder.linear_dim}) in "
      f"{workdir}/linear_tower.npz"])
  return text, dict(workdir=str(workdir), **figures)


def _define_distributed(fv):
  flags.DEFINE_bool("distributed", False, "join a multi-process run with "
                    "jax.distributed.initialize(); on TPU pods and SLURM the processes find each "
                    "other, elsewhere give --coordinator, --num-processes and --process-id",
                    flag_values=fv)
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (implies --distributed)",
                      flag_values=fv)
  flags.DEFINE_integer("num-processes", None, "processes in the run", flag_values=fv)
  flags.DEFINE_integer("process-id", None, "this process's index", flag_values=fv)


def _join(fv):
  """JAX, after joining the other processes when --distributed or --coordinator asks to."""
  import jax  # pylint: disable=g-import-not-at-top
  if fv.coordinator or fv.distributed:
    # CPU processes reduce across each other through gloo; the setting is ignored elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(fv.coordinator, fv["num-processes"].value,
                               fv["process-id"].value)
  elif fv["num-processes"].value is not None or fv["process-id"].value is not None:
    raise UsageError("--num-processes and --process-id need --coordinator or --distributed")
  return jax


def _define_embed(fv):
  flags.DEFINE_string("dataset", None, "offline dataset (mnist5k, animal_mnist, public, "
                      "fashion_mnist), a tfds name (cifar10, coco_captions) or folder:PATH",
                      flag_values=fv)
  flags.DEFINE_string("split", "train", "split to embed", flag_values=fv)
  flags.DEFINE_string("workdir", None, "directory of the stores (default: the config's "
                      "embed.out); they go to WORKDIR/DATASET-SPLIT", flag_values=fv)
  flags.DEFINE_string("out", None, "the stores' exact directory (default: WORKDIR/DATASET-SPLIT); "
                      "a rerun resumes", flag_values=fv)
  _define_distributed(fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("embed", "embed a dataset split into image and caption embedding stores", _define_embed,
         takes_config=True)
def _embed(fv, config):
  config = _need_config(config, "embed")
  if not fv.dataset:
    raise UsageError("--dataset is required")
  jax = _join(fv)
  from dprdm_jax import embed  # pylint: disable=g-import-not-at-top
  # folder:PATH stores go to WORKDIR/NAME-SPLIT, NAME the folder's own name.
  name = pathlib.Path(fv.dataset.split(":", 1)[1]).name if fv.dataset.startswith(
      "folder:") else fv.dataset
  out = pathlib.Path(fv.out or f"{fv.workdir or config.embed.out}/{name}-{fv.split}")
  result = embed.embed(config, fv.dataset, fv.split, out)
  text = (f"{result['dataset']}: {result['records']:,} records; embedded now "
          f"{result['embedded_now']:,} images at {result['images_per_second']:,.0f} images/s and "
          f"{result['distinct_captions']:,} distinct captions at "
          f"{result['captions_per_second']:,.0f} captions/s (compilation included) on "
          f"{result['devices']} "
          f"{jax.default_backend().upper()} device(s)")
  for kind, store in result.get("stores", {}).items():
    text += f"\n  {kind:<8} store {store['path']}: {store['records']:,} x {store['dim']}, " \
            f"fingerprint {store['fingerprint'][:16]}..."
  return text, result


def _define_train(fv):
  flags.DEFINE_string("workdir", None, "work directory (default: the config's train.workdir); a "
                      "rerun resumes from its last checkpoint", flag_values=fv)
  _define_distributed(fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("train", "train the retrieval-augmented U-Net on the public data", _define_train,
         takes_config=True)
def _train(fv, config):
  config = _need_config(config, "train")
  jax = _join(fv)
  from dprdm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = fv.workdir or config.train.workdir
  result = train.train(config, workdir)
  text = (f"trained to step {result['steps']} (from {result['started_at']}) in "
          f"{result['seconds']:,.0f} s on {result['devices']} {jax.default_backend().upper()} "
          f"device(s): {result['trained_steps_per_second']:.2f} steps/s including compilation; "
          f"{result['parameters']:,} parameters; checkpoints, metrics.jsonl and TensorBoard "
          f"events in {workdir}")
  return text, result


def _define_export(fv):
  flags.DEFINE_string("workdir", None, "work directory of `dprdm train` (default: the config's "
                      "train.workdir)", flag_values=fv)
  flags.DEFINE_string("out", None, "the release directory to write (replaced if it exists)",
                      flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("export", "write a trained U-Net's EMA parameters as a release (dprdm_jax/release.py)",
         _define_export, takes_config=True)
def _export(fv, config):
  config = _need_config(config, "train")
  from dprdm_jax import release  # pylint: disable=g-import-not-at-top
  if not fv.out:
    raise UsageError("--out is required")
  workdir = fv.workdir or config.train.workdir
  manifest = release.export(config, workdir, fv.out, command=" ".join(["dprdm", *sys.argv[1:]]))
  return (f"release of step {manifest['step']:,} in {fv.out} (config hash "
          f"{manifest['config_hash'][:12]}...)"), manifest


def _define_sample(fv):
  flags.DEFINE_string("workdir", None, "work directory of `dprdm train` (default: the config's "
                      "train.workdir)", flag_values=fv)
  flags.DEFINE_string("out", None, "the PNG to write (default: WORKDIR/samples.png)",
                      flag_values=fv)
  flags.DEFINE_integer("rows", 20, "public test images, one per class first", flag_values=fv)
  flags.DEFINE_integer("per-row", 6, "samples drawn from each test image's context",
                       flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("sample", "a grid of samples conditioned on public test neighbours (no private data)",
         _define_sample, takes_config=True)
def _sample(fv, config):
  config = _need_config(config, "diffusion")
  from dprdm_jax import sample  # pylint: disable=g-import-not-at-top
  workdir = fv.workdir or config.train.workdir
  out = fv.out or str(pathlib.Path(workdir) / "samples.png")
  start = time.perf_counter()
  result = sample.sample_grid(config, workdir, out, fv.rows, fv["per-row"].value)
  result["seconds"] = time.perf_counter() - start
  d = config.diffusion
  text = (f"wrote {out}: {result['rows']} public test images x {result['per_row']} samples from "
          f"the EMA parameters of step {result['checkpoint_step']} (context: the mean of "
          f"{result['k']} public training neighbours; {d.sample_steps} DDIM steps, eta "
          f"{d.eta}, guidance scale {d.guidance_scale}, x0 clipped to {d.clip_x0}) in "
          f"{result['seconds']:.0f} s")
  return text, result


def _define_generate(fv):
  flags.DEFINE_string("prompt", None, "one prompt (or use --prompts)", flag_values=fv)
  flags.DEFINE_string("prompts", None, "a UTF-8 text file, one prompt per line", flag_values=fv)
  flags.DEFINE_string("workdir", None, "directory of the outputs (default: the config's "
                      "generate.out); they go to WORKDIR/MODE", flag_values=fv)
  flags.DEFINE_string("out", None, "the outputs' exact directory (default: WORKDIR/MODE)",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "private", ["private", "public", "nonprivate", "none"],
                    "private: DP-RDM, charged to the ledger; public: k nearest public records "
                    "(free); nonprivate: the private set with q = 1 and no noise (epsilon = "
                    "infinity, needs --allow-nonprivate); none: the prompt alone (free)",
                    flag_values=fv)
  flags.DEFINE_string("ledger", None, "budget ledger file (default: the config's generate.ledger)",
                      flag_values=fv)
  flags.DEFINE_integer("repeat", 1, "images per prompt (each one query)", flag_values=fv)
  flags.DEFINE_bool("allow-nonprivate", False, "allow --mode nonprivate (a comparison that "
                    "releases the private set without protection)", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("generate", "DP-RDM: images of the private domain from prompts, charged to the budget",
         _define_generate, takes_config=True)
def _generate(fv, config):
  config = _need_config(config, "generate")
  import jax  # pylint: disable=g-import-not-at-top
  from dprdm_jax import generate  # pylint: disable=g-import-not-at-top
  if (fv.prompt is None) == (fv.prompts is None):
    raise UsageError("give exactly one of --prompt TEXT and --prompts FILE")
  if fv.repeat < 1:
    raise UsageError(f"--repeat must be >= 1, got {fv.repeat}")
  prompts = [fv.prompt] if fv.prompt is not None else generate.read_prompts(fv.prompts)
  generate.check_count(len(prompts) * fv.repeat)  # before the list is built
  prompts = [p for p in prompts for _ in range(fv.repeat)]
  # Empty or blank prompts are refused before any model loads; lengths wait for the tokenizer.
  generate.check_prompts(prompts, lambda ps: [0] * len(ps), 1)
  out = fv.out or str(pathlib.Path(fv.workdir or config.generate.out) / fv.mode)
  result = generate.generate(config, prompts, out, fv.mode, fv.ledger,
                             allow_nonprivate=fv["allow-nonprivate"].value)
  if fv.mode == "private":
    privacy = (f"dataset {result['dataset'][:16]}...: {result['queries_charged']:,} private "
               f"queries charged, epsilon spent {_fmt_eps(result['epsilon_spent'])} of "
               f"{result['epsilon_budget']:g} "
               f"at delta {result['delta']:.3g} ({result['accountant'].upper()}, {ADJACENCY} "
               f"adjacency)")
  else:
    privacy = result["note"]
  text = (f"wrote {result['generated_now']:,} of {result['prompts']:,} images ({fv.mode}) to "
          f"{out} in {result['seconds']:,.0f} s ({result['images_per_second']:.2f} images/s on "
          f"{result['devices']} {jax.default_backend().upper()} device(s)); {privacy}")
  return text, result


def _define_workdir_json(fv):
  flags.DEFINE_string("workdir", None, "work directory (default: the config's classifier.workdir)",
                      flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("train-classifier", "train the evaluation classifier (public data, Fashion-MNIST test)",
         _define_workdir_json, takes_config=True)
def _train_classifier(fv, config):
  config = _need_config(config, "classifier")
  from dprdm_jax.evaluate import classifier  # pylint: disable=g-import-not-at-top
  workdir = fv.workdir or config.classifier.workdir
  figures = classifier.train(config, workdir)
  sizes = figures["test_sizes"]
  text = (f"evaluation classifier in {workdir}: test accuracy {figures['accuracy_public']:.4f} on "
          f"the public test split ({sizes['public']:,} images, "
          f"{len(classifier.DOMAINS['public'])} classes), "
          f"{figures['accuracy_fashion_mnist']:.4f} on the odd half of Fashion-MNIST test "
          f"({sizes['fashion_mnist']:,} images, {len(classifier.DOMAINS['fashion_mnist'])} "
          f"classes); {len(classifier.class_captions())}-way classification")
  return text, dict(workdir=str(workdir), **figures)


def _define_hit_rate(fv):
  _define_workdir_json(fv)
  flags.DEFINE_list("dirs", None, "output directories of `dprdm generate`", flag_values=fv)


@command("hit-rate", "class and domain hit-rates of generated images (evaluation classifier)",
         _define_hit_rate, takes_config=True)
def _hit_rate(fv, config):
  config = _need_config(config, "classifier")
  from dprdm_jax.evaluate import classifier  # pylint: disable=g-import-not-at-top
  if not fv.dirs:
    raise UsageError("--dirs is required")
  model = classifier.load(fv.workdir or config.classifier.workdir)
  rows, lines = {}, []
  for directory in fv.dirs:
    records, images = classifier.read_generated(directory)
    r = classifier.hit_rates(model, [x["prompt"] for x in records], images)
    r.update(mode=records[0]["mode"], epsilon=records[-1].get("epsilon_spent",
                                                              records[-1].get("epsilon")))
    rows[directory] = r
    eps = r["epsilon"]
    eps_text = (f"epsilon {eps:.3f} at delta {records[-1]['delta']:.3g} "
                f"({records[-1]['accountant'].upper()}, {ADJACENCY})"
                if isinstance(eps, float) and records[0]["mode"] == "private" else
                f"epsilon {eps}")
    lines.append(f"{directory}: {r['mode']}, {r['images']} images, class hit-rate "
                 f"{r['class_hit_rate']:.3f} +- {r['class_hit_rate_se']:.3f}, domain hit-rate "
                 f"{r['domain_hit_rate']:.3f} +- {r['domain_hit_rate_se']:.3f} (chance "
                 f"{r['chance_class']:.3f} over {len(classifier.class_captions())} classes; +- one "
                 f"standard error); {eps_text}")
  return "\n".join(lines), rows


def _define_evaluate(fv):
  flags.DEFINE_string("workdir", None, "report directory, which also holds the sweep's samples "
                      "(default: the config's evaluate.out)", flag_values=fv)
  flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=fv)


@command("evaluate", "the paper's comparison at a fixed budget: sweep, curves, report",
         _define_evaluate, takes_config=True)
def _evaluate(fv, config):
  config = _need_config(config, "evaluate")
  from dprdm_jax.evaluate import sweep  # pylint: disable=g-import-not-at-top
  summary = sweep.evaluate(config, fv.workdir)
  out = pathlib.Path(fv.workdir or config.evaluate.out)
  final = {r["setting"]["mode"]: r for r in summary["final"]}
  lines = [f"report: {out / 'report.md'} (best private setting {summary['best']})"]
  (key, title, _), fd_title = summary["metrics"][0], dict(
      (k, t) for k, t, _ in summary["metrics"])["fd"]
  for mode, r in final.items():
    lines.append(f"  {mode:>10}: epsilon {_fmt_eps(r['epsilon'])}, {title} "
                 f"{r[key]:.3f} +- {r[key + '_se']:.3f}, {fd_title} {r['fd']:.2f} +- "
                 f"{r['fd_se']:.2f}, {r['images']} images")
  t, ledger = summary["target"], summary["evaluation_ledger"]
  lines.append(f"  epsilon at T = {t['num_queries']:,} queries, delta {t['delta']:.3g} "
               f"({t['accountant'].upper()}, {ADJACENCY}); this evaluation charged "
               f"{ledger['queries']:,} queries to {ledger['path']} (epsilon "
               f"{_fmt_eps(ledger['epsilon_spent'])}), nothing to the deployment ledger")
  return "\n".join(lines), sweep.jsonable(summary)


def _usage() -> str:
  lines = ["usage: dprdm COMMAND [ACTION] [--flags]   (add --help for the flags)", ""]
  lines += [f"  {' '.join(words):<18} {c.help}" for words, c in COMMANDS.items()]
  return "\n".join(lines)


def _find(argv: list[str]) -> Optional[tuple[str, ...]]:
  for n in (1, 2):
    if len(argv) > n and tuple(argv[1:n + 1]) in COMMANDS:
      return tuple(argv[1:n + 1])
  return None


def main(argv: list[str]) -> int:
  """Runs one command; returns the exit status (0 ok, 2 bad input); other errors propagate."""
  words = _find(argv)
  if words is None:
    asked_help = len(argv) > 1 and argv[1] in ("-h", "--help")
    print(_usage(), file=sys.stdout if asked_help else sys.stderr)
    return 0 if asked_help else 2
  name = "dprdm " + " ".join(words)
  cmd = COMMANDS[words]
  args = [name] + argv[1 + len(words):]
  fv = flags.FlagValues()
  cmd.define(fv)
  if cmd.takes_config:
    config_flags.DEFINE_config_file("config", None, "config file (FILE or FILE:ARG)",
                                    flag_values=fv, sys_argv=args)
  if any(a in ("-h", "--help", "-help") for a in args[1:]):
    print(f"{name}: {cmd.help}\n{fv.get_help()}")
    return 0
  try:
    try:
      rest = fv(args)
      # config_flags applies overrides while parsing but loads the file lazily: touch it now.
      config = fv["config"].value if "config" in fv else None
      if config is not None:
        config.privacy
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
      raise UsageError(f"--config: the config has no field {str(e).strip(chr(34) + chr(39))!r}") \
          from None
    except (OSError, TypeError) as e:  # the config file itself
      raise UsageError(f"--config: {e}") from None
    if len(rest) > 1:
      raise UsageError(f"unexpected argument {rest[1]!r}")
    text, data = cmd.execute(fv, config)
  except (flags.Error, errors.Error) as e:
    # Only the project's own errors (UsageError, LedgerError, StoreError ... derive from
    # errors.Error) and flag errors; anything else is a bug and shows its traceback. Config errors
    # arrive as multi-line reports with a traceback inside; the last line says why.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    print(f"{name}: error: {lines[-1]}", file=sys.stderr)
    return 2
  print(json.dumps(data, allow_nan=False) if fv.json else text)
  return 0


# The accelerator plugins of jax's extras: where one is installed, jax runs there, not on the CPU.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin")
_CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_environment(environ: dict, cores: int,
                            accelerator_installed: bool) -> Optional[str]:
  """The XLA_FLAGS a CPU-only run should start jax with, or None to leave it as it is.

  On a CPU, one JAX device per core: every job's mesh (config.mesh.data = -1) then splits its
  batches over the cores, which the U-Net's many small operations on one device leave half idle
  (training 1.4x and sampling 1.7x as fast on 2 cores, benchmarks/README.md). Left alone: a run
  that sets the device count itself (the tests, the benchmarks' contenders), one that names a
  platform other than the CPU (JAX_PLATFORMS), and a machine with an accelerator plugin.
  """
  xla_flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  if (_CPU_DEVICES_FLAG in xla_flags or accelerator_installed or
      (platforms and platforms.strip().lower() != "cpu") or cores < 2):
    return None
  return f"{xla_flags} {_CPU_DEVICES_FLAG}={cores}".strip()


def run():
  """The console script: one JAX CPU device per core on a CPU-only machine (set before jax
  starts; `cpu_devices_environment`), then the command."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  flags_value = cpu_devices_environment(
      os.environ, cores or 1,
      any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS))
  if flags_value is not None and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = flags_value
  sys.exit(main(sys.argv))
