"""What `dprdm evaluate` measures generated images with: the judge named by config.evaluate.features.

  classifier  (the offline default) the evaluation classifier's penultimate features against the
              held-out odd half of Fashion-MNIST test, which no retrieval and no classifier
              training reads; prompts are the private domain's ten class captions; the class and
              domain hit-rates are the classifier's labels. The best setting has the highest class
              hit-rate.
  clip:PATH   (real data: configs/coco.py, configs/cifar10.py) a pretrained CLIP's image features
              against the first config.evaluate.reference_size records of the private dataset's
              held-out split config.evaluate.reference_split; prompts are the first
              config.evaluate.num_prompts distinct captions of those records (MS-COCO: val
              captions, as in the paper; CIFAR-10: the class prompts); the CLIP score of each
              image against its own prompt. The best setting has the lowest FD, as in the paper.

Both measure Frechet distance, KID and precision / recall / density / coverage on their features
(metrics.py), named for the features (never plain FID: neither is Inception's).
"""

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from dprdm_jax import errors
from dprdm_jax.evaluate import metrics

# (key, column title, which way is better) of the distribution metrics, titled per feature network.
_DISTRIBUTION = (("fd", "FD"), ("kid", "KID"), ("precision", None), ("recall", None),
                 ("density", None), ("coverage", None))


@dataclasses.dataclass(frozen=True)
class Judge:
  """Prompts, reference features and the metrics of one config's evaluation.

  Attributes:
    features_name: the feature network, as the report names it.
    short_name: "classifier features" or "CLIP features", for column titles.
    prompts: the prompts every setting is drawn for.
    reference_name, reference_features: the held-out set the distribution metrics compare with.
    scores: (prompts, images) -> {metric: value, metric_se: standard error} beyond the
      distribution metrics (hit-rates or CLIP score).
    own_metrics: (key, title, better) of what `scores` returns; the first is set against
      non-private retrieval in the report.
    select: the metric that picks the best setting, and "higher" or "lower".
  """

  features_name: str
  short_name: str
  prompts: list[str]
  reference_name: str
  reference_features: np.ndarray
  features: Callable[[np.ndarray], np.ndarray]
  scores: Callable[[list[str], np.ndarray], dict]
  own_metrics: tuple[tuple[str, str, str], ...]
  select: tuple[str, str]

  @property
  def metrics(self) -> tuple[tuple[str, str, str], ...]:
    """Every (key, title, better) a measured setting holds, in report order."""
    rows = [(k, f"{title} ({self.short_name})" if title else k,
             "lower" if k in ("fd", "kid") else "higher") for k, title in _DISTRIBUTION]
    return self.own_metrics + tuple(rows)

  def best(self, results: list[dict]) -> dict:
    key, better = self.select
    return (max if better == "higher" else min)(results, key=lambda r: r[key])


def _classifier_judge(config: ml_collections.ConfigDict) -> Judge:
  from dprdm_jax.data import offline  # pylint: disable=g-import-not-at-top
  from dprdm_jax.evaluate import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  model = classifier_lib.load(config.classifier.workdir)
  images, _ = classifier_lib.splits(config.data.resolution)["test_fashion_mnist"]

  def scores(prompts, images):
    hits = classifier_lib.hit_rates(model, prompts, images)
    return {k: hits[k] for k in ("class_hit_rate", "class_hit_rate_se", "domain_hit_rate",
                                 "domain_hit_rate_se")}

  return Judge(
      features_name="evaluation-classifier penultimate layer", short_name="classifier features",
      prompts=list(offline.class_captions(config.data.private)),
      reference_name=(f"Fashion-MNIST test, odd positions ({len(images):,} images; never "
                      "retrieved from, never seen by the classifier)"),
      reference_features=model.features(images), features=model.features, scores=scores,
      own_metrics=(("class_hit_rate", "class hit-rate", "higher"),
                   ("domain_hit_rate", "domain hit-rate", "higher")),
      select=("class_hit_rate", "higher"))


def distinct_prompts(captions, count: int) -> list[str]:
  """The first `count` distinct captions, in order; ValueError if there are fewer."""
  prompts = list(dict.fromkeys(str(c) for c in captions))[:count]
  if len(prompts) < count:
    raise errors.InputError(f"the reference records hold {len(prompts)} distinct captions, fewer "
                            f"than config.evaluate.num_prompts = {count}")
  return prompts


def _clip_judge(config: ml_collections.ConfigDict, path: str) -> Judge:
  from dprdm_jax import embed  # pylint: disable=g-import-not-at-top
  e = config.evaluate
  encoder = embed.load_clip(path)
  reference = embed.open_source(config, config.data.private, e.reference_split)
  if len(reference) < e.reference_size:
    raise errors.InputError(f"{config.data.private} {e.reference_split} holds {len(reference):,} "
                            "records, fewer than config.evaluate.reference_size = "
                            f"{e.reference_size:,}")
  records = reference.read(np.arange(e.reference_size))

  def scores(prompts, images):
    distinct = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    text = encoder.encode_text(list(distinct))[[distinct[p] for p in prompts]]
    per_image = metrics.clip_scores(encoder.encode_images(images), text)
    return dict(clip_score=float(per_image.mean()),
                clip_score_se=float(per_image.std(ddof=1) / np.sqrt(len(per_image))))

  return Judge(
      features_name=f"CLIP image tower ({path}), {encoder.dim}-d", short_name="CLIP features",
      prompts=distinct_prompts(records["caption"], e.num_prompts),
      reference_name=(f"{config.data.private} {e.reference_split}, the first "
                      f"{e.reference_size:,} records (never retrieved from)"),
      reference_features=encoder.encode_images(records["image"]), features=encoder.encode_images,
      scores=scores, own_metrics=(("clip_score", "CLIP score", "higher"),),
      select=("fd", "lower"))


def load(config: ml_collections.ConfigDict) -> Judge:
  """The judge named by config.evaluate.features ("classifier" or "clip:PATH")."""
  spec = config.evaluate.features
  if spec == "classifier":
    return _classifier_judge(config)
  if spec.startswith("clip:"):
    return _clip_judge(config, spec[len("clip:"):])
  raise errors.InputError(f"evaluate.features must be 'classifier' or 'clip:PATH', got {spec!r}")
