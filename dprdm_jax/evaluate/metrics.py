"""Distribution metrics of generated images against a reference set, on given features.

No Inception network installs offline, so the offline default measures on the penultimate layer
of the project's own evaluation classifier (`classifier.Loaded.features`); every figure is named
for the features it used (e.g. "FD (classifier features)"), never plain FID or KID, because the
numbers are not comparable with Inception-based ones.

  frechet_distance   ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))   (Heusel et al., 2017)
  kernel_distance    the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged
                     over random subsets (KID, Binkowski et al., 2018)
  prdc               precision, recall, density and coverage on k-nearest-neighbour balls
                     (Naeem et al., 2020; Kynkaanniemi et al., 2019)
  clip_score         100 * mean max(cos(image, prompt), 0) on CLIP embeddings (Hessel et al.,
                     2021, with torchmetrics' scale): for real data with a pretrained CLIP
  bootstrap          the standard error of any of them, resampling the generated set

scipy.linalg's symmetric eigensolver gives FD's matrix square root; the rest is numpy: these run
once per report on a few thousand vectors, so a jitted version would buy nothing.
"""

from typing import Callable, Optional

import numpy as np
import scipy.linalg

from dprdm_jax import errors


def _features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise errors.InputError(f"{name} must be (n >= 2, d) features, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise errors.InputError(f"{name} holds non-finite features")
  return x


def frechet_distance_of_moments(mu1, cov1, mu2, cov2) -> float:
  """The Frechet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
               - 2 * _trace_sqrt_product(cov1, cov2))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  values, vectors = scipy.linalg.eigh(cov)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """tr((cov1 cov2)^(1/2)) of two covariance (PSD) matrices, singular ones included.

  cov1 cov2 is similar to the PSD matrix M = cov1^(1/2) cov2 cov1^(1/2), so the trace is the sum
  of the square roots of M's eigenvalues (clipped at 0 against round-off). Unlike sqrtm of the
  product, this needs no regularisation when fewer samples than features make a covariance
  singular (60 images per sweep setting on 256 features), and raises no warning there.
  """
  root1 = _psd_sqrt(cov1)
  values = scipy.linalg.eigvalsh(root1 @ cov2 @ root1)
  return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(real, generated) -> float:
  """FD between Gaussians fitted to two feature sets (n, d) (unbiased covariances)."""
  real, generated = _features(real, "real"), _features(generated, "generated")
  return frechet_distance_of_moments(real.mean(0), np.cov(real, rowvar=False),
                                     generated.mean(0), np.cov(generated, rowvar=False))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  d = x.shape[1]
  kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
  m, n = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_distance(real, generated, num_subsets: int = 50, subset_size: int = 1000,
                    seed: int = 0) -> float:
  """KID: the unbiased polynomial-kernel MMD^2, the mean over `num_subsets` random subsets of
  min(subset_size, n) samples of each set (seeded, so a report is reproducible)."""
  real, generated = _features(real, "real"), _features(generated, "generated")
  size = min(subset_size, len(real), len(generated))
  rng = np.random.default_rng(seed)
  return float(np.mean([
      _mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                     generated[rng.choice(len(generated), size, replace=False)])
      for _ in range(num_subsets)]))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
  return np.sqrt(np.maximum(d2, 0))


def kth_neighbour_radius(x, k: int) -> np.ndarray:
  """Each point's distance to its k-th nearest other point of the same set (n, d) -> (n,)."""
  x = _features(x, "features")
  return np.partition(_pairwise(x, x), k, axis=1)[:, k]  # the point itself is at distance 0


def prdc(real, generated, nearest_k: int = 5,
         real_radius: Optional[np.ndarray] = None) -> dict[str, float]:
  """Precision, recall, density and coverage (Naeem et al., 2020, their `prdc` definitions).

  precision  share of generated samples inside some real sample's k-NN ball
  recall     share of real samples inside some generated sample's k-NN ball
  density    (1 / k) * mean over generated samples of how many real balls hold them
  coverage   share of real samples whose ball holds at least one generated sample

  real_radius: `kth_neighbour_radius(real, nearest_k)`, when the caller has it already.
  """
  real, generated = _features(real, "real"), _features(generated, "generated")
  if not 1 <= nearest_k < min(len(real), len(generated)):
    raise errors.InputError(f"nearest_k must lie in [1, {min(len(real), len(generated)) - 1}], "
                            f"got {nearest_k}")
  if real_radius is None:
    real_radius = kth_neighbour_radius(real, nearest_k)
  fake_radius = kth_neighbour_radius(generated, nearest_k)
  between = _pairwise(real, generated)  # (real, generated)
  inside_real = between < real_radius[:, None]
  return dict(
      precision=float(inside_real.any(axis=0).mean()),
      recall=float((between < fake_radius[None, :]).any(axis=1).mean()),
      density=float(inside_real.sum(axis=0).mean() / nearest_k),
      coverage=float((between.min(axis=1) < real_radius).mean()))


def bootstrap(metric: Callable[[np.ndarray], dict[str, float]], generated, rounds: int = 50,
              seed: int = 0) -> dict[str, tuple[float, float]]:
  """{name: (value on `generated`, its bootstrap standard error)} of a metric that returns named
  values: the std of each over `rounds` resamples of the generated samples with replacement (the
  reference set is held fixed). For prdc a resample's repeated points are each other's nearest
  neighbours, which shrinks the generated balls: its recall errors are rough, the others' are not
  affected."""
  generated = np.asarray(generated)
  rng = np.random.default_rng(seed)
  values = metric(generated)
  draws = [metric(generated[rng.integers(0, len(generated), len(generated))])
           for _ in range(rounds)]
  return {name: (float(value), float(np.std([d[name] for d in draws], ddof=1)))
          for name, value in values.items()}


def clip_scores(image_embeddings, text_embeddings) -> np.ndarray:
  """Per-pair CLIP scores: 100 * max(cosine(image_i, text_i), 0), float64 (n,).

  Row i of each is one generated image and the prompt it was drawn for, embedded by the same
  CLIP (`encoders.clip`); the rows need not be normalised.
  """
  images = _features(image_embeddings, "image embeddings")
  texts = _features(text_embeddings, "text embeddings")
  if images.shape != texts.shape:
    raise errors.InputError(f"one prompt per image: image embeddings {images.shape}, text "
                            f"embeddings {texts.shape}")
  norms = np.linalg.norm(images, axis=1) * np.linalg.norm(texts, axis=1)
  if (norms == 0).any():
    raise errors.InputError("a zero embedding has no cosine")
  cosines = np.einsum("nd,nd->n", images, texts) / norms
  return 100.0 * np.maximum(cosines, 0.0)


def clip_score(image_embeddings, text_embeddings) -> float:
  """CLIP score: the mean of `clip_scores` over the pairs."""
  return float(clip_scores(image_embeddings, text_embeddings).mean())
