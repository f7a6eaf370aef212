"""Hit-rates against a hand computation; prompts outside the class captions are refused."""

import numpy as np
import pytest

from dprdm_jax.evaluate import classifier


class Fixed:
  """A stand-in for the classifier in this arithmetic test only: it returns given labels."""

  def __init__(self, labels):
    self.labels = np.asarray(labels)

  def predict(self, images):
    assert len(images) == len(self.labels)
    return self.labels


def test_class_and_domain_hit_rates_by_hand():
  captions = classifier.class_captions()
  assert len(captions) == 60 and captions[50] == "a photo of a t-shirt"
  assert captions[35] == "a running shoe emoji"
  prompts = [captions[57]] * 4 + [captions[3]] * 2  # 4 sneakers, 2 digit threes
  # sneaker, sneaker, sandal, running-shoe emoji | three, t-shirt
  predicted = [57, 57, 55, 35, 3, 50]
  r = classifier.hit_rates(Fixed(predicted), prompts, np.zeros((6, 32, 32, 1), np.uint8))
  assert r["class_hit_rate"] == pytest.approx(3 / 6)
  assert r["class_hit_rate_se"] == pytest.approx(np.sqrt(0.5 * 0.5 / 6))
  # The sandal is Fashion-MNIST's; the emoji and the t-shirt are not the prompts' domain.
  assert r["domain_hit_rate"] == pytest.approx(4 / 6)
  assert r["per_class"] == {captions[57]: 0.5, captions[3]: 0.5}
  assert r["chance_class"] == pytest.approx(1 / 60)


def test_prompts_must_be_class_captions():
  with pytest.raises(ValueError, match="not a class caption"):
    classifier.hit_rates(Fixed([0]), ["a photo of a scarf"], np.zeros((1, 32, 32, 1), np.uint8))
