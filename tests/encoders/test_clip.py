"""The CLIP towers, on a tiny random CLIP saved to disk: round trip, norms, channels, bad input.

The tokenizer is a byte-level BPE vocabulary written here (every byte symbol, alone and
word-final, a few merges, then the two special tokens), so nothing is downloaded.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import transformers
from transformers.models.clip import tokenization_clip

from dprdm_jax.encoders import clip

MERGES = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>", "c a", "ca t</w>", "d o", "do g</w>"]
CAPTIONS = ["a photo of a cat", "a photo of a dog", "dog", "", "CAT!! 🐱 photo?",
            "a long caption " * 30]


def write_tokenizer(directory):
  """Writes a tiny CLIP BPE tokenizer to `directory`; returns (end-of-text id, vocab size)."""
  symbols = sorted(set(tokenization_clip.bytes_to_unicode().values()))
  tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {token: i for i, token in enumerate(tokens)}
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  tokenizer = transformers.CLIPTokenizerFast(
      vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"))
  tokenizer.save_pretrained(directory)
  return vocab["<|endoftext|>"], len(vocab)


def random_params(shapes):
  """Normal(0, 0.02) weights (LayerNorm scales 1 + that), drawn in numpy.

  The model's own initialiser takes XLA ~15 s to compile on two cores; this takes none.
  """
  rng = np.random.default_rng(0)

  def draw(path, shape):
    noise = rng.normal(0.0, 0.02, shape.shape).astype(shape.dtype)
    return noise + 1 if path[-1].key == "scale" else noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


def save_tiny_clip(directory, layers: int = 2, max_positions: int = 40):
  """Saves a tiny random CLIP (16-d projections, 32x32 images) and its tokenizer to `directory`;
  returns (model, params)."""
  eos, vocab_size = write_tokenizer(directory)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=2,
                       max_position_embeddings=max_positions, bos_token_id=eos - 1,
                       eos_token_id=eos, pad_token_id=eos),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16)
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  params = random_params(model.params_shape_tree)
  model.save_pretrained(directory, params=params)
  return model, params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny random CLIP: the directory it was saved to, and an encoder of the in-memory model."""
  directory = tmp_path_factory.mktemp("tiny_clip")
  model, params = save_tiny_clip(directory)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  return directory, clip.ClipEncoder(model, params, tokenizer)


@pytest.fixture(scope="module")
def encoder(saved):
  return clip.ClipEncoder.load(saved[0], local_files_only=True)


def images(n, size=28, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def test_round_trip_gives_identical_features(saved, encoder):
  _, in_memory = saved
  assert encoder.dim == 16 and encoder.max_length == 40 and encoder.image_size == 32
  np.testing.assert_array_equal(encoder.encode_text(CAPTIONS), in_memory.encode_text(CAPTIONS))
  x = images(5)
  np.testing.assert_array_equal(encoder.encode_images(x), in_memory.encode_images(x))


def test_text_rows_are_unit_and_batch_invariant(encoder):
  whole = encoder.encode_text(CAPTIONS)
  assert whole.shape == (len(CAPTIONS), 16) and whole.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(encoder.encode_text(CAPTIONS, batch_size=2), whole,
                             rtol=0, atol=1e-5)
  assert np.abs(whole[0] - whole[1]).max() > 1e-3  # different captions, different vectors
  # The long caption is cut at 40 tokens: more words change nothing.
  longer = encoder.encode_text([CAPTIONS[-1] + " and more words"])
  np.testing.assert_allclose(longer[0], whole[-1], rtol=0, atol=1e-5)


def test_text_centring(encoder):
  center = encoder.fit_center(CAPTIONS)
  centred = encoder.encode_text(CAPTIONS, center=center)
  expected = encoder.encode_text(CAPTIONS) - center
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(centred, expected, rtol=0, atol=1e-5)


def test_image_rows_are_unit_and_batch_invariant(encoder):
  x = images(7)
  whole = encoder.encode_images(x)
  assert whole.shape == (7, 16) and whole.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(encoder.encode_images(x, batch_size=3), whole, rtol=0, atol=1e-6)
  # A random tower maps noise images close together, but each row stays with its image.
  assert np.abs(whole[0] - whole[1]).max() > 1e-4
  np.testing.assert_allclose(encoder.encode_images(x[::-1]), whole[::-1], rtol=0, atol=1e-6)


def test_grayscale_equals_its_rgb_replica(encoder):
  gray = images(4, channels=1, seed=1)
  np.testing.assert_array_equal(encoder.encode_images(gray),
                                encoder.encode_images(np.repeat(gray, 3, axis=-1)))


def test_non_square_images_are_centre_cropped(encoder):
  square = images(2, size=32)
  wide = np.zeros((2, 32, 48, 3), np.uint8)
  wide[:, :, 8:40] = square
  np.testing.assert_allclose(encoder.encode_images(wide), encoder.encode_images(square),
                             rtol=0, atol=1e-6)


def test_preprocessor_config_sets_normalisation(saved, encoder, tmp_path):
  custom = shutil.copytree(saved[0], tmp_path / "custom")
  (custom / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
  x = images(3)
  assert not np.allclose(clip.ClipEncoder.load(custom, local_files_only=True).encode_images(x),
                         encoder.encode_images(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((2, 8, 8, 3), np.float32), TypeError, "uint8"),
    ([[[[0, 0, 0]]]], TypeError, "numpy array"),
    (np.zeros((2, 8, 8), np.uint8), ValueError, "trailing axis"),
    (np.zeros((2, 8, 8, 4), np.uint8), ValueError, "C = 1 or 3"),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
])
def test_bad_images(encoder, bad, error, match):
  with pytest.raises(error, match=match):
    encoder.encode_images(bad)


def test_bad_captions_and_paths(encoder, tmp_path):
  with pytest.raises(ValueError, match="empty"):
    encoder.encode_text([])
  with pytest.raises(TypeError, match=r"captions\[0\] is a int"):
    encoder.encode_text([1])
  with pytest.raises(ValueError, match=r"shape \(16,\)"):
    encoder.encode_text(["a"], center=np.zeros(384))
  with pytest.raises(FileNotFoundError, match="no model directory"):
    clip.ClipEncoder.load(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither flax_model.msgpack nor model.safetensors"):
    clip.ClipEncoder.load(tmp_path / "empty", local_files_only=True)
