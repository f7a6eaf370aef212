"""Distribution metrics against hand computations and closed forms."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from dprdm_jax.evaluate import metrics


def test_frechet_distance_of_two_known_gaussians():
  # ||mu1 - mu2||^2 = 1 + 4; tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 + 4 - 4) + (4 + 9 - 12) = 2.
  fd = metrics.frechet_distance_of_moments([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0]))
  assert fd == pytest.approx(7.0)
  # A rotation of both covariances leaves the distance unchanged.
  c, s = np.cos(0.3), np.sin(0.3)
  r = np.array([[c, -s], [s, c]])
  fd_rotated = metrics.frechet_distance_of_moments(
      [0, 0], r @ np.diag([1.0, 4.0]) @ r.T, r @ np.array([1, 2]), r @ np.diag([4.0, 9.0]) @ r.T)
  assert fd_rotated == pytest.approx(7.0)
  assert metrics.frechet_distance_of_moments([3], [[2.0]], [3], [[2.0]]) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_samples_converges_to_the_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200_000, 2)) * [1, 2]
  b = rng.normal(size=(200_000, 2)) * [2, 3] + [1, 2]
  assert metrics.frechet_distance(a, b) == pytest.approx(7.0, rel=0.02)


def test_frechet_distance_of_singular_covariances_without_warnings():
  """Fewer samples than features (the sweep's 60 images on 256 features): a closed form where
  both covariances are singular, and sqrtm's answer on a full-rank pair of random covariances."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # Rank one each, along the same axis: tr sqrt(S1 S2) = sqrt(1 * 4) = 2; FD = 1 + (1 + 4 - 4).
    assert metrics.frechet_distance_of_moments(
        [0, 0, 0], np.diag([1.0, 0, 0]), [1, 0, 0], np.diag([4.0, 0, 0])) == pytest.approx(2.0)
    # Orthogonal rank-one covariances: the product is 0, FD = 1 + 4.
    assert metrics.frechet_distance_of_moments(
        [0, 0], np.diag([1.0, 0]), [0, 0], np.diag([0, 4.0])) == pytest.approx(5.0)
    rng = np.random.default_rng(3)
    fd = metrics.frechet_distance(rng.normal(size=(60, 256)), rng.normal(size=(60, 256)) + 0.1)
    assert np.isfinite(fd) and fd > 0
  x, y = rng.normal(size=(2, 8, 8))
  cov1, cov2 = x @ x.T, y @ y.T + np.eye(8)
  expected = np.trace(cov1) + np.trace(cov2) - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2).real)
  assert metrics.frechet_distance_of_moments(np.zeros(8), cov1, np.zeros(8), cov2) == \
      pytest.approx(expected, rel=1e-9)


def test_kernel_distance_by_hand():
  # d = 1, k(x, y) = (xy + 1)^3: within x {1, 2}: 27; within y {0, 3}: 1; across: (1 + 64 + 1 +
  # 343) / 4 = 102.25. Unbiased MMD^2 = 27 + 1 - 2 * 102.25.
  kid = metrics.kernel_distance([[1.0], [2.0]], [[0.0], [3.0]], num_subsets=3, subset_size=2)
  assert kid == pytest.approx(27 + 1 - 204.5)


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 1000, 8))
  assert abs(metrics.kernel_distance(a, b, num_subsets=10, subset_size=500)) < 0.01
  assert metrics.kernel_distance(a, b + 0.5, num_subsets=10, subset_size=500) > 0.05


def test_prdc_on_a_small_fixed_example():
  # k = 1. Real {0, 1, 3, 7}: radii 1, 1, 2, 4. Generated {0.5, 2, 2.5}: radii 1.5, 0.5, 0.5.
  # precision: every generated point lies in a real ball (0.5 in 0's, 2 and 2.5 in 3's) -> 1.
  # recall: 0 and 1 lie in 0.5's ball; 3 and 7 in none -> 1/2.
  # density: 0.5 lies in the balls of 0 and 1, 2 and 2.5 in 3's -> (2 + 1 + 1) / 3.
  # coverage: 0, 1 and 3 have a generated point inside their ball, 7 does not -> 3/4.
  real = np.array([[0.0], [1.0], [3.0], [7.0]])
  generated = np.array([[0.5], [2.0], [2.5]])
  got = metrics.prdc(real, generated, nearest_k=1)
  assert got == pytest.approx(dict(precision=1.0, recall=0.5, density=4 / 3, coverage=0.75))


def test_bootstrap_standard_error_of_a_mean():
  x = np.random.default_rng(2).normal(size=(400, 1))
  got = metrics.bootstrap(lambda g: dict(mean=g.mean(), twice=2 * g.mean()), x, rounds=200)
  assert got["mean"][0] == pytest.approx(x.mean())
  assert got["mean"][1] == pytest.approx(1 / np.sqrt(400), rel=0.2)
  assert got["twice"][1] == pytest.approx(2 * got["mean"][1])


def test_bad_features_are_refused():
  with pytest.raises(ValueError, match=r"\(n >= 2, d\)"):
    metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.kernel_distance(np.full((4, 2), np.nan), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="nearest_k"):
    metrics.prdc(np.zeros((4, 2)), np.zeros((3, 2)), nearest_k=3)


def test_clip_score_by_hand():
  # cosines 1 (same direction, other length), 0.6 and -0.8 (clipped to 0): 100 * 1.6 / 3.
  images = [[2.0, 0.0], [3.0, 4.0], [-3.0, -4.0]]
  texts = [[5.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
  assert metrics.clip_score(images, texts) == pytest.approx(100 * 1.6 / 3)
  np.testing.assert_allclose(metrics.clip_scores(images, texts), [100.0, 60.0, 0.0])
  with pytest.raises(ValueError, match="one prompt per image"):
    metrics.clip_score(images, texts[:2])
  with pytest.raises(ValueError, match="zero embedding"):
    metrics.clip_score([[0.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]])
