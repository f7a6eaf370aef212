"""The project's own errors: the ones `dprdm` turns into a one-line message with exit status 2.

Every error the library raises on purpose, because a caller's input or the state on disk is wrong,
derives from `Error`; anything else that escapes a job is a bug and keeps its traceback. The
subclasses also derive from the built-in class a caller would expect (`InputError` is a
ValueError, `MissingError` a FileNotFoundError, `WrongTypeError` a TypeError), so library users
may catch either.
"""

import pathlib


class Error(Exception):
  """Base of every error dprdm-jax raises on purpose."""


class InputError(Error, ValueError):
  """A value, file or setting given to the library is out of range or malformed."""


class MissingError(Error, FileNotFoundError):
  """A file or directory a job needs does not exist (e.g. a model not trained yet)."""


class WrongTypeError(Error, TypeError):
  """An argument of the wrong type (a str where a list of str belongs, a float array of pixels)."""


def make_directory(path) -> pathlib.Path:
  """Makes the directory `path` (and its parents) if missing; InputError, naming the path and the
  reason, when it cannot be one (a file is there, a parent is not writable)."""
  path = pathlib.Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot create the directory {path}: {e.strerror or e}") from None
  return path
