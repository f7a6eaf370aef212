"""Bad input everywhere: property-based (hypothesis) for the Python API, a corpus for the CLI.

Every bad input must meet one clear error of the project's kind (ValueError and its subclasses,
LedgerError), never a crash of another kind, and must leave nothing charged or changed on disk.
"""

import math
import os
import sqlite3

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from dprdm_jax import cli
from dprdm_jax import generate
from dprdm_jax.privacy import accounting
from dprdm_jax.privacy import aggregate
from dprdm_jax.privacy import keys
from dprdm_jax.privacy import ledger as ledger_lib
from dprdm_jax.retrieval import store as store_lib
from dprdm_jax.retrieval import subsample

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.booleans(), st.none(), st.text(max_size=3))


@FAST
@given(sigma=numbers, q=numbers, k=numbers)
def test_a_mechanism_is_built_or_refused_with_a_value_error(sigma, q, k):
  try:
    m = accounting.Mechanism(sigma, q, k)
  except ValueError:
    return
  assert m.noise_std >= 0 and 0 < m.sampling_rate <= 1 and m.num_neighbors >= 1
  assert math.isfinite(m.noise_multiplier)


@pytest.mark.parametrize("sigma, count, delta", [
    (1e-300, 1000, 1e-5), (1e300, 1000, 1e-5), (0.1, 10**12, 1e-5), (0.1, 1000, 1e-320),
    (0.0, 1, 1e-5), (5e-324, 1, 0.5)])
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_extreme_numbers_give_an_epsilon_or_a_value_error(sigma, count, delta, accountant):
  try:
    eps = accounting.history_epsilon({accounting.Mechanism(sigma, 0.01, 16): count}, delta,
                                     accountant)
  except ValueError as e:
    assert "accountant" in str(e)
    return
  assert eps >= 0  # inf is an epsilon too (sigma = 0 protects nothing)


@FAST
@given(bad=st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda x: not 0 < x < 1 if math.isfinite(x) else True), st.integers(), st.text(max_size=2)))
def test_a_bad_delta_or_epsilon_is_refused(bad):
  with pytest.raises(ValueError):
    accounting.check_delta(bad)
  if not (isinstance(bad, (int, float)) and not isinstance(bad, bool) and math.isfinite(bad)
          and bad > 0):
    with pytest.raises(ValueError):
      accounting.check_epsilon(bad)


@FAST
@given(rows=st.lists(st.lists(st.floats(width=32), min_size=4, max_size=4), min_size=2,
                     max_size=2))
def test_clipping_holds_for_any_floats(rows):
  """R2 for any input the retrieval could return, NaN, infinities and huge values included."""
  x = np.asarray(rows, np.float32)[None]  # (1, k = 2, d = 4)
  mean = np.asarray(aggregate.clipped_mean(x, np.ones((1, 2), bool)))
  assert np.isfinite(mean).all() and np.linalg.norm(mean) <= 1 + 1e-5


@FAST
@given(prompt=st.one_of(st.text(max_size=50), st.binary(max_size=20), st.integers(), st.none()))
def test_a_prompt_is_accepted_or_refused_clearly(prompt):
  lengths = lambda ps: [len(p.encode()) + 2 for p in ps]  # a stand-in tokenizer: bytes
  try:
    out = generate.check_prompts([prompt], lengths, 32)
  except generate.GenerateError:
    return
  assert out == [prompt] and isinstance(prompt, str) and prompt.strip()


def test_a_prompt_that_is_not_utf8_text_is_refused(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes(b"a photo of a \xff\xfe shoe\n")
  with pytest.raises(generate.GenerateError, match="UTF-8"):
    generate.read_prompts(path)


@pytest.mark.parametrize("embeddings", [
    np.full((3, 4), np.nan, np.float32), np.full((3, 4), np.inf, np.float32),
    np.zeros((3, 4), np.float32), np.ones((3,), np.float32),
    np.array([["a", "b"]]), np.ones((2, 3), np.complex64)])
def test_bad_embeddings_never_make_a_store(tmp_path, embeddings):
  with pytest.raises(ValueError):
    store_lib.EmbeddingStore.write(tmp_path / "store", embeddings)
  assert not (tmp_path / "store" / "manifest.json").exists()


@FAST
@given(q=st.floats(allow_nan=True, allow_infinity=True))
def test_a_sampling_rate_is_a_limit_or_refused(q):
  try:
    keep = subsample.limit(q)
  except ValueError:
    assert not 2.0**-32 <= q <= 1.0
    return
  assert 0 <= int(keep) <= 2**32 - 1


@FAST
@given(count=st.one_of(st.integers(-10**20, 10**20), st.floats(), st.booleans(), st.none()))
def test_a_bad_or_absurd_count_charges_nothing(tmp_path_factory, count):
  path = tmp_path_factory.mktemp("ledger") / "l.db"
  with ledger_lib.Ledger(path, create=True) as ledger:
    ledger.register("fp", 1.0, 1e-5, "rdp")
    try:
      grant = ledger.charge("fp", accounting.Mechanism(0.5, 0.01, 8), count)
    except (ValueError, ledger_lib.LedgerError):
      assert ledger.status()[0].queries == 0 and ledger.verify() == []
      return
    assert grant.count == count and ledger.status()[0].queries == count


def test_keys_refuse_query_numbers_past_the_key_space():
  with pytest.raises(ValueError):
    keys.query_keys(1, 2**64 - 1, 2, keys.Stream.NOISE)
  assert jax.random.key_data(keys.query_keys(1, 2**64 - 2, 2, keys.Stream.NOISE)).shape[0] == 2


# The CLI corpus: (argv, a phrase of the one-line error). Each must exit 2 and change nothing.
CORPUS = [
    (["privacy", "epsilon", "--sigma", "1e-300", "--sampling-rate", "0.01", "--neighbors", "16",
      "--queries", "1000000000000", "--dataset-size", "1000", "--accountant", "pld"],
     "PLD accountant composes at most"),
    (["privacy", "epsilon", "--sigma", "nan", "--sampling-rate", "0.01", "--neighbors", "16",
      "--queries", "10", "--dataset-size", "1000"], "finite"),
    (["privacy", "epsilon", "--sigma", "0.1", "--sampling-rate", "0.01", "--neighbors", "16",
      "--queries", "10", "--delta", "1e-400"], "delta"),
    (["privacy", "calibrate", "--epsilon", "1e9", "--sampling-rate", "0.01", "--neighbors", "16",
      "--queries", "10", "--dataset-size", "1000", "--accountant", "rdp"], "protects nothing"),
    (["privacy", "plan", "--dataset-size", "0", "--epsilon", "1"], "dataset-size"),
    (["privacy", "epsilon", "--config", "configs/nonexistent.py"], "config"),
    (["privacy", "epsilon", "--config", "configs/default.py", "--config.privacy.bogus=1"],
     "no field"),
    (["privacy", "epsilon", "--config", "configs/default.py", "--config.privacy.noise_std=abc"],
     "could not convert"),
    (["generate", "--config", "configs/default.py:tiny", "--prompt", "  "], "prompt 0 is empty"),
    (["budget", "status", "--ledger", "LEDGER_JUNK"], "ledger"),
    (["budget", "verify", "--ledger", "LEDGER_JUNK"], "ledger"),
    (["index", "build", "--from-npy", "NPY_NAN", "--out", "OUT_INDEX"], "non-finite"),
    # Not a ledger: named as such, with no advice to chmod someone else's file.
    (["budget", "status", "--ledger", "TMP_DIR"], "not a ledger file"),
    (["budget", "verify", "--ledger", "TEXT_FILE"], "not an SQLite database"),
    (["generate", "--config", "configs/default.py:tiny", "--prompt", "x", "--repeat",
      "1000000000"], "at most 1,000,000"),
    (["generate", "--config", "configs/default.py:tiny", "--prompt", "x", "--out", "TEXT_FILE"],
     "cannot create the directory"),
    (["evaluate", "--config", "configs/default.py:tiny", "--config.evaluate.out=TEXT_FILE"],
     "cannot create the directory"),
]


@pytest.mark.parametrize("argv, phrase", CORPUS, ids=[" ".join(a[:2]) + f" {i}"
                                                      for i, (a, _) in enumerate(CORPUS)])
def test_the_cli_corpus_exits_2_with_one_line_and_changes_nothing(argv, phrase, tmp_path,
                                                                  capsys):
  ledger_path = tmp_path / "ledger.db"
  with ledger_lib.Ledger(ledger_path, create=True) as ledger:
    ledger.register("fp", 1.0, 1e-5, "rdp")
  junk = tmp_path / "junk.db"
  junk.write_bytes(b"\x00garbage" * 64)
  os.chmod(junk, 0o600)
  np.save(tmp_path / "nan.npy", np.full((4, 3), np.nan, np.float32))
  text = tmp_path / "passwd"
  text.write_text("root:x:0:0:root:/root:/bin/bash\n")
  os.chmod(text, 0o644)
  replace = {"LEDGER_JUNK": str(junk), "NPY_NAN": str(tmp_path / "nan.npy"),
             "OUT_INDEX": str(tmp_path / "index"), "TMP_DIR": str(tmp_path),
             "TEXT_FILE": str(text)}
  for name, value in replace.items():  # placeholders may sit inside a flag (--x.out=TEXT_FILE)
    argv = [a.replace(name, value) for a in argv]
  before = sorted(p.name for p in tmp_path.iterdir())
  status = cli.main(["dprdm", *argv, "--ledger" if argv[0] == "generate" else "--json"]
                    + ([str(ledger_path)] if argv[0] == "generate" else []))
  _, err = capsys.readouterr()
  assert status == 2, err
  errors = [line for line in err.splitlines() if ": error: " in line]  # progress lines may precede
  assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and phrase in errors[0], err
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
  assert text.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
  assert os.stat(text).st_mode & 0o777 == 0o644
  db = sqlite3.connect(ledger_path)
  assert db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0
  db.close()
