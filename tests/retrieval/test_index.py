"""ScaNN indexes: exact search against numpy, fast-mode recall, persistence, input checks."""

import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from dprdm_jax.retrieval import index as index_lib


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _table(n, d, seed):
  """n random unit rows and non-contiguous ids, not in row order."""
  rng = np.random.default_rng(seed)
  ids = 1000 + 7 * rng.permutation(n).astype(np.int64)
  return _unit(rng.normal(size=(n, d))), ids


def _clustered(n, d, clusters, num_queries, seed):
  """Unit vectors around `clusters` random centres, and queries near random rows of the data."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(clusters, d)))
  noise = lambda m: rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
  data = _unit(centres[rng.integers(clusters, size=n)] + noise(n))
  queries = _unit(data[rng.integers(n, size=num_queries)] + noise(num_queries))
  return data, queries


def _fast_config(num_rows, **overrides):
  config = index_lib.index_config(num_rows)
  config.mode = "fast"
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def small():
  data, ids = _table(120, 16, seed=0)
  queries = _unit(np.random.default_rng(1).normal(size=(8, 16)))
  return data, ids, queries, index_lib.ScannIndex.build(data, ids)


@pytest.mark.parametrize("k", [1, 5, 37, 120, 500])
def test_exact_search_equals_numpy_brute_force(small, k):
  data, ids, queries, index = small
  scores = queries.astype(np.float64) @ data.T.astype(np.float64)
  order = np.argsort(-scores, axis=1, kind="stable")
  ranked = np.take_along_axis(scores, order, axis=1)
  assert np.diff(ranked, axis=1).max() < -5e-6  # no near-ties: the order is unambiguous
  found, found_scores = index.search(queries, k)
  assert found.shape == found_scores.shape == (8, k)
  assert found.dtype == np.int64 and found_scores.dtype == np.float32
  m = min(k, len(data))
  np.testing.assert_array_equal(found[:, :m], ids[order[:, :m]])
  np.testing.assert_allclose(found_scores[:, :m], ranked[:, :m], atol=1e-6)
  assert (found[:, m:] == index_lib.PAD_ID).all()
  assert np.isneginf(found_scores[:, m:]).all()


def test_exact_index_reports_itself(small):
  data, ids, _, index = small
  assert index.is_exact and index.mode == "exact"
  assert (index.num_rows, index.dim) == data.shape
  np.testing.assert_array_equal(index.ids, ids)
  assert not index.ids.flags.writeable


def test_bfloat16_tables_and_queries_are_searched_as_float32(small):
  data, ids, queries, _ = small
  rounded = data.astype(ml_dtypes.bfloat16)
  index = index_lib.ScannIndex.build(rounded, ids)
  expected = index_lib.ScannIndex.build(rounded.astype(np.float32), ids, index.config)
  for x, y in zip(index.search(queries.astype(ml_dtypes.bfloat16), 7),
                  expected.search(queries.astype(ml_dtypes.bfloat16).astype(np.float32), 7)):
    np.testing.assert_array_equal(x, y)


def test_score_ties_go_to_the_lower_row():
  data, _ = _table(10, 8, seed=2)
  data = np.repeat(data, 3, axis=0)  # rows 3i, 3i+1, 3i+2 are equal
  index = index_lib.ScannIndex.build(data, np.arange(30)[::-1].copy())
  found, _ = index.search(data[:1], 3)
  np.testing.assert_array_equal(found, [[29, 28, 27]])


def test_empty_query_batch(small):
  found, scores = small[3].search(np.zeros((0, 16), np.float32), 4)
  assert found.shape == scores.shape == (0, 4)


def test_fast_mode_recall_at_10_on_clustered_data():
  data, queries = _clustered(100_000, 128, 1000, 1000, seed=3)
  ids = np.arange(len(data), dtype=np.int64) * 3 + 5
  fast = index_lib.ScannIndex.build(data, ids)
  assert fast.mode == "fast" and not fast.is_exact
  exact = index_lib.ScannIndex.build(data, ids, dict(fast.config, mode="exact"))
  found, scores = fast.search(queries, 10)
  truth, _ = exact.search(queries, 10)
  recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
  assert recall >= 0.95
  assert (np.diff(scores, axis=1) <= 0).all()


def _same_results(a, b, queries, k):
  for x, y in zip(a.search(queries, k), b.search(queries, k)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_save_load_round_trip_survives_a_move(tmp_path, monkeypatch, mode):
  data, ids = _table(3000, 16, seed=4)
  queries = _unit(np.random.default_rng(5).normal(size=(50, 16)))
  index = index_lib.ScannIndex.build(data, ids, _fast_config(3000, mode=mode))
  assert index.mode == mode
  index.save(tmp_path / "saved")
  loaded = index_lib.ScannIndex.load(tmp_path / "saved")
  assert loaded.config == index.config and loaded.dim == 16
  np.testing.assert_array_equal(loaded.ids, ids)
  _same_results(index, loaded, queries, 10)
  _same_results(index, loaded, queries, 4000)  # padded past N in both
  shutil.copytree(tmp_path / "saved", tmp_path / "elsewhere" / "copy")
  shutil.rmtree(tmp_path / "saved")
  monkeypatch.chdir(tmp_path / "elsewhere")
  _same_results(index, index_lib.ScannIndex.load("copy"), queries, 10)


def test_save_refuses_a_non_empty_directory_and_fills_an_empty_one(tmp_path, small):
  index = small[3]
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "other.txt").write_text("not mine")
  with pytest.raises(FileExistsError, match="not an empty directory"):
    index.save(tmp_path / "full")
  assert os.listdir(tmp_path / "full") == ["other.txt"]
  (tmp_path / "empty").mkdir()
  index.save(tmp_path / "empty")
  _same_results(index, index_lib.ScannIndex.load(tmp_path / "empty"), small[2], 5)
  assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # no staging directory left behind


def test_load_refuses_what_is_not_an_index(tmp_path, small):
  with pytest.raises(ValueError, match="not an index saved by ScannIndex.save"):
    index_lib.ScannIndex.load(tmp_path / "missing")
  (tmp_path / "stray").mkdir()
  (tmp_path / "stray" / "dataset.npy").write_bytes(b"x")
  with pytest.raises(ValueError, match="not an index saved by ScannIndex.save"):
    index_lib.ScannIndex.load(tmp_path / "stray")
  small[3].save(tmp_path / "index")
  manifest_path = tmp_path / "index" / "index.json"
  manifest = json.loads(manifest_path.read_text())
  manifest_path.write_text("{not json")
  with pytest.raises(ValueError, match="not an index manifest"):
    index_lib.ScannIndex.load(tmp_path / "index")
  manifest_path.write_text(json.dumps(dict(manifest, format_version=99)))
  with pytest.raises(ValueError, match="index format 99"):
    index_lib.ScannIndex.load(tmp_path / "index")
  manifest_path.write_text(json.dumps(dict(manifest, num_rows=121)))
  with pytest.raises(ValueError, match=r"expected int64 \(121,\)"):
    index_lib.ScannIndex.load(tmp_path / "index")


@pytest.mark.parametrize("embeddings, ids, match", [
    (np.ones(16, np.float32), np.arange(1), r"\(N, d\) matrix"),
    (np.zeros((0, 16), np.float32), np.arange(0), r"\(N, d\) matrix"),
    (np.eye(4, dtype=np.int32), np.arange(4), "floating point"),
    (np.eye(4) * 1.02, np.arange(4), "row 0 has norm 1.02"),
    (np.full((4, 4), np.nan), np.arange(4), "non-finite"),
    (np.eye(4), np.arange(3), r"ids must have shape \(4,\)"),
    (np.eye(4), np.array([3, 1, 3, 2]), r"unique; \[3\] repeat"),
    (np.eye(4), np.array([0, 1, 2, -1]), ">= 0"),
    (np.eye(4), np.array([0, 1, 2, 2**63], np.uint64), ">= 0"),
    (np.eye(4), np.arange(4.0), "must be integers"),
])
def test_build_refuses_a_bad_table(embeddings, ids, match):
  with pytest.raises(ValueError, match=match):
    index_lib.ScannIndex.build(embeddings, ids)


@pytest.mark.parametrize("queries, k, match", [
    (np.ones((2, 15), np.float32), 3, r"shape \(B, 16\)"),
    (np.ones(16, np.float32), 3, r"shape \(B, 16\)"),
    (np.ones((2, 16), np.int64), 3, "floating point"),
    (np.full((2, 16), np.inf, np.float32), 3, "non-finite"),
    (np.ones((2, 16), np.float32), 0, "k must be an integer >= 1"),
    (np.ones((2, 16), np.float32), 2.0, "k must be an integer >= 1"),
    (np.ones((2, 16), np.float32), True, "k must be an integer >= 1"),
])
def test_search_refuses_bad_queries(small, queries, k, match):
  with pytest.raises(ValueError, match=match):
    small[3].search(queries, k)


@pytest.mark.parametrize("overrides, match", [
    (dict(mode="approximate"), "mode must be one of"),
    (dict(num_leaves_to_search=20, num_leaves=10), r"num_leaves_to_search \(20\) exceeds"),
    (dict(reorder_k=0), "reorder_k must be an integer >= 1"),
    (dict(num_leaves=-3), "num_leaves must be an integer >= 1"),
    (dict(dims_per_block=1.5), "dims_per_block must be an integer >= 1"),
    (dict(spherical=1), "spherical must be a bool"),
    (dict(num_leaves=121, num_leaves_to_search=1), r"num_leaves \(121\) exceeds the 120 rows"),
    (dict(training_sample_size=5), r"num_leaves \(10\) exceeds the 5 rows"),
    (dict(dims_per_block=17), r"dims_per_block \(17\) exceeds d \(16\)"),
])
def test_build_refuses_a_bad_config(small, overrides, match):
  data, ids, _, _ = small
  with pytest.raises(ValueError, match=match):
    index_lib.ScannIndex.build(data, ids, dict(_fast_config(120), **overrides))


def test_build_refuses_missing_or_unknown_config_fields(small):
  data, ids, _, _ = small
  config = _fast_config(120).to_dict()
  del config["reorder_k"]
  with pytest.raises(ValueError, match=r"missing \['reorder_k'\], unknown \[\]"):
    index_lib.ScannIndex.build(data, ids, config)
  with pytest.raises(ValueError, match=r"missing \[\], unknown \['leaves'\]"):
    index_lib.ScannIndex.build(data, ids, dict(_fast_config(120), leaves=3))


@pytest.mark.parametrize("num_rows", [1, 50, 19_999, 20_000, 100_000, 10**6, 10**8])
def test_default_config_scales_with_n(num_rows):
  config = index_lib.index_config(num_rows)
  assert config.mode == "auto"
  expected = "exact" if num_rows < 20_000 else "fast"
  assert index_lib.resolve_mode(config.mode, num_rows) == expected
  assert config.num_leaves == math.isqrt(num_rows)
  assert 1 <= config.num_leaves_to_search <= max(1, config.num_leaves // 10)
  assert config.num_leaves <= config.training_sample_size <= num_rows
  assert config.dims_per_block == 2 and 100 <= config.reorder_k <= 1000


def test_default_index_is_exact_below_20k_rows():
  data, ids = _table(19_999, 8, seed=6)
  assert index_lib.ScannIndex.build(data, ids).is_exact


def test_config_needs_a_positive_number_of_rows():
  with pytest.raises(ValueError, match="num_rows must be an integer >= 1"):
    index_lib.index_config(0)
