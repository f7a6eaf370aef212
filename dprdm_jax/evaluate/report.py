"""The report of `dprdm evaluate`: report.md, plots/*.png (matplotlib) and grids/*.png.

Every table and figure states what its numbers assume: epsilon with its delta, accountant and
adjacency, the number of queries T, the sample count, and the feature network of the distribution
metrics. The results it is written from are in results.json beside it (sweep.evaluate).
"""

import json
import math
import pathlib
import re
import textwrap

import numpy as np

MODE_NAMES = {"private": "DP-RDM", "public": "public-only retrieval",
              "nonprivate": "non-private retrieval", "none": "no retrieval"}
GRID_COLUMNS = 8


def _eps(x) -> str:
  if isinstance(x, str) or not math.isfinite(x):
    return "∞"
  return f"{x:.2f}"


def _cell(r: dict, key: str) -> str:
  value, se = r[key], r[f"{key}_se"]
  digits = 2 if key in ("fd", "clip_score") else 4 if key == "kid" else 3
  return f"{value:.{digits}f} ± {se:.{digits}f}"


def _title(summary: dict, key: str) -> str:
  return next(title for k, title, _ in summary["metrics"] if k == key)


def _table(summary: dict, rows: list[dict], title_first: str = "setting") -> list[str]:
  head = [title_first, "mode", "k", "q", "σ", "λ", "w", "ε at T", "T", "n"]
  head += [title for _, title, _ in summary["metrics"]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    s = r["setting"]
    values = [r["name"], MODE_NAMES[s["mode"]],
              "–" if s["k"] is None else str(s["k"]),
              "–" if s["q"] is None else f"{s['q']:g}",
              "–" if s["sigma"] is None else f"{s['sigma']:.4f}",
              f"{s['interpolation']:g}", f"{s['guidance_scale']:g}",
              _eps(r["epsilon"]), "–" if s["num_queries"] is None else f"{s['num_queries']:,}",
              str(r["images"])]
    values += [_cell(r, key) for key, _, _ in summary["metrics"]]
    lines.append("| " + " | ".join(values) + " |")
  return lines


def _ratio_lines(summary: dict) -> list[str]:
  """FD against public-only retrieval, and the judge's first own metric against non-private."""
  final = {r["setting"]["mode"]: r for r in summary["final"]}
  dp, pub, non = final["private"], final["public"], final["nonprivate"]
  fd_drop = 1 - dp["fd"] / pub["fd"]
  fd_text = (f"**{100 * fd_drop:.0f}% lower**" if fd_drop >= 0 else
             f"**{-100 * fd_drop:.0f}% higher**")
  key = summary["metrics"][0][0]
  title = _title(summary, key)
  match_text = (f"**{100 * dp[key] / non[key]:.0f}% of it**" if non[key] > 0 else
                "(non-private retrieval scores 0)")
  return [
      f"- {_title(summary, 'fd')}: DP-RDM {_cell(dp, 'fd')} against public-only retrieval "
      f"{_cell(pub, 'fd')}: {fd_text} (the bar: at least 40% lower).",
      f"- {title[:1].upper() + title[1:]}: DP-RDM {_cell(dp, key)} against non-private retrieval "
      f"{_cell(non, key)}: {match_text} (the bar: within 25%, i.e. at least 75%).",
  ]


def _plot_curve(summary: dict, rows: list[dict], x_key: str, x_label: str,
                baselines: list[dict], path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  better = {k: b for k, _, b in summary["metrics"]}
  panels = [(k, f"{_title(summary, k)} ({better[k]} is better)")
            for k in (summary["metrics"][0][0], "kid", "fd")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
  finite = [r for r in rows if r["setting"]["mode"] == "private"]
  infinite = [r for r in rows if r["setting"]["mode"] == "nonprivate"]
  xs = [r["setting"][x_key] if x_key == "num_queries" else r["epsilon"] for r in finite]
  for ax, (key, label) in zip(axes, panels):
    ys = [r[key] for r in finite]
    errors = [r[f"{key}_se"] for r in finite]
    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="DP-RDM")
    for r in infinite:  # epsilon = infinity, drawn at the right edge
      ax.axhline(r[key], color="tab:green", linestyle="--",
                 label=f"non-private retrieval (ε = ∞), n = {r['images']}")
    for r, color in zip(baselines, ("tab:red", "tab:gray")):
      ax.axhline(r[key], color=color, linestyle=":",
                 label=f"{MODE_NAMES[r['setting']['mode']]} (ε = 0), n = {r['images']}")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:,.0f}" if float(x).is_integer() else f"{x:.3g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(x_label)
    ax.set_title(label, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(textwrap.fill(title, 170), fontsize=9)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _prompt_list(prompts: list[str], shown: int = 10) -> str:
  text = "; ".join(f"“{p}”" for p in prompts[:shown])
  return text + (f"; and {len(prompts) - shown} more" if len(prompts) > shown else "")


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _grids(summary: dict, out: pathlib.Path) -> list[tuple[str, str]]:
  """One PNG per prompt: a row per final mode, its first GRID_COLUMNS images (labelled)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  written = []
  target = summary["target"]
  for i, prompt in enumerate(summary["prompts"]):
    fig, axes = plt.subplots(len(summary["final"]), GRID_COLUMNS,
                             figsize=(GRID_COLUMNS * 0.9 + 1.8, len(summary["final"]) * 0.95 + 0.6))
    for row, r in zip(axes, summary["final"]):
      directory = pathlib.Path(r["directory"])
      records = [json.loads(line) for line in
                 (directory / "records.jsonl").read_text().splitlines()]
      mine = [x for x in records if x["prompt"] == prompt][:GRID_COLUMNS]
      for ax in row:
        ax.axis("off")
      for ax, x in zip(row, mine):
        ax.imshow(np.asarray(Image.open(directory / x["image"])), cmap="gray", vmin=0, vmax=255)
      mode = r["setting"]["mode"]
      row[0].text(-0.15, 0.5, f"{MODE_NAMES[mode]}\nε = {_eps(r['epsilon'])}",
                  transform=row[0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"“{prompt}”: ε at T = {target['num_queries']:,} queries, δ = "
                 f"{target['delta']:.3g}, {target['accountant'].upper()}, {target['adjacency']}",
                 fontsize=7)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.88, bottom=0.02, wspace=0.05, hspace=0.1)
    path = out / "grids" / f"{i:02d}-{_slug(prompt)[:60]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append((prompt, str(path.relative_to(out))))
  return written


def write(summary: dict, out) -> pathlib.Path:
  """Writes report.md, its plots and its grids into `out`; returns the report's path."""
  out = pathlib.Path(out)
  (out / "plots").mkdir(parents=True, exist_ok=True)
  t = summary["target"]
  assumption = (f"δ = {t['delta']:.3g} (1/N, N = {summary['private_set_size']:,} private "
                f"records), {t['accountant'].upper()} accountant, {t['adjacency']} adjacency")
  final = {r["setting"]["mode"]: r for r in summary["final"]}
  baselines = [final["public"], final["none"]]
  by_eps_title = (f"Quality against ε at T = {t['num_queries']:,} queries; {assumption}; "
                  f"n = {summary['by_epsilon'][0]['images']} images per point; "
                  f"features: {summary['features']}; ± one bootstrap standard error")
  by_t_title = (f"Quality against T at ε = {t['epsilon']:g}; {assumption}; "
                f"n = {summary['by_queries'][0]['images']} images per point; "
                f"features: {summary['features']}")
  _plot_curve(summary, summary["by_epsilon"], "epsilon", "ε (log scale)", baselines,
              out / "plots" / "epsilon.png", by_eps_title)
  _plot_curve(summary, summary["by_queries"], "num_queries", "T, queries the budget covers (log scale)",
              baselines, out / "plots" / "queries.png", by_t_title)
  grids = _grids(summary, out)
  ledger = summary["evaluation_ledger"]
  lines = [
      "# DP-RDM evaluation report",
      "",
      f"Prompts: {len(summary['prompts'])} ({_prompt_list(summary['prompts'])}). Reference set: "
      f"{summary['reference']['name']}, {summary['reference']['size']:,} images. Distribution "
      f"metrics on the {summary['features']} (not Inception: FD and KID here are not "
      "comparable with published FID/KID). ± is one standard error (bootstrap over the "
      "generated samples for FD, KID and prdc; binomial for hit-rates; of the mean for the CLIP "
      "score).",
      "",
      f"Every ε is the accountant's for T queries of the setting: {assumption}.",
      "",
      "## The comparison",
      "",
      f"The best private setting at ε ≤ {t['epsilon']:g} over T = {t['num_queries']:,} queries "
      f"(`{summary['best']}`) against the baselines, same prompts and sample keys:",
      "",
      *_table(summary, summary["final"]),
      "",
      *_ratio_lines(summary),
      "",
      "## Sweep at the target budget",
      "",
      f"Stage 1 varies k and q (σ calibrated per setting to ε = {t['epsilon']:g} at T = "
      f"{t['num_queries']:,}); stage 2 varies λ and the guidance scale w around the best, which "
      "leaves ε unchanged (post-processing). The best has the "
      f"{'highest' if summary['select'][1] == 'higher' else 'lowest'} "
      f"{_title(summary, summary['select'][0])}.",
      "",
      *_table(summary, summary["grid"] + summary["post"]),
      "",
      "## Curves",
      "",
      "![quality against epsilon](plots/epsilon.png)",
      "",
      "![quality against T](plots/queries.png)",
      "",
      *_table(summary, summary["by_epsilon"] + summary["by_queries"]),
      "",
      "## Samples",
      "",
      f"One grid per prompt, one row per mode of the comparison (first {GRID_COLUMNS} images).",
      "",
      *[f"![{prompt}]({path})" for prompt, path in grids],
      "",
      "## What this evaluation spent",
      "",
      f"The samples above are real releases from the private set. They were charged to the "
      f"evaluation ledger `{ledger['path']}`, never to the deployment ledger "
      f"(`{summary['deployment_ledger']}`): {ledger['queries']:,} private queries, composed ε = "
      f"{_eps(ledger['epsilon_spent'])} at the same δ ({ledger['accountant'].upper()}, an upper "
      "bound). Non-private retrieval "
      "(ε = ∞) is a comparison that a deployment would never release. The choice of the best "
      "setting from these measurements is not itself private (as in the paper's sweeps): a "
      "deployment should fix its settings on public or held-out data.",
      "",
  ]
  path = out / "report.md"
  path.write_text("\n".join(lines))
  return path
