"""A restricted unpickler for the data sets' ``.pkl`` files, which are untrusted input.

A pickle is a small program: its ``GLOBAL`` / ``STACK_GLOBAL`` opcodes name any importable
callable and ``REDUCE`` calls it, so ``pickle.load`` on a crafted file runs whatever it names
(``os.system``, say). :func:`load` admits only what NumPy needs to rebuild arrays, dtypes and
scalars (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``, ``_frombuffer``, under NumPy 1's
and NumPy 2's module names) and the two helpers with which Python 3 writes ``bytes`` under
protocol 2 (``_codecs.encode`` to latin-1, ``bytes()``), each replaced by a version that accepts
only that use. Lists, dicts, tuples, strings, numbers and booleans are opcodes, not globals, so
they load as usual; persistent ids are refused (the standard unpickler's default). Every other
global is refused with a one-line ``ValueError`` naming the file, before anything is called.

Files written by Python 2 (CIFAR-100's, tiered-ImageNet's) are read with ``encoding="latin1"``,
NumPy's advice for its arrays: Python 2 strings become ``str``. Callers accept ``bytes`` keys as
well (:func:`key`), for copies written again by Python 3.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["key", "load", "load_bytes", "text"]


def _numpy_core(dotted: str) -> Any:
    """``numpy._core.<dotted>`` (NumPy 2), else ``numpy.core.<dotted>`` (NumPy 1)."""
    module, _, attr = dotted.rpartition(".")
    for core in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{core}.{module}"), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy's {dotted} is missing")  # pragma: no cover


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for ``bytes``, and only so."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1", errors)


def _empty_bytes() -> bytes:
    """``bytes()`` as Python 3's protocol-2 pickles write ``b""``; no other call."""
    return b""


def _allowed() -> dict[tuple[str, str], Callable[..., Any]]:
    out: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    for dotted in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer"):
        module, _, name = dotted.rpartition(".")
        for core in ("numpy.core", "numpy._core"):  # the name a NumPy 1 or 2 pickle holds
            out[(f"{core}.{module}", name)] = _numpy_core(dotted)
    return out


_ALLOWED = _allowed()


class _Refused(Exception):
    """A global (or a use of one) outside :data:`_ALLOWED`."""


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def load(path: Path, fix: str) -> Any:
    """Unpickle ``path`` admitting only NumPy arrays and plain containers.

    ``fix`` ends every error message (say, which file to fetch again). ``ValueError``, one line,
    for a refused global (the file may run code), a truncated or corrupt file, or one that
    cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return _load(f, str(path), fix)
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror or err}); {fix}") from err


def load_bytes(data: bytes, where: str, fix: str) -> Any:
    """:func:`load` on bytes already read (a member of an archive); ``where`` names them."""
    return _load(io.BytesIO(data), where, fix)


def _load(f: IO[bytes], where: str, fix: str) -> Any:
    try:
        return _Restricted(f, encoding="latin1").load()
    except _Refused as err:
        raise ValueError(
            f"{where} was refused: it names the global {err}, and metagrad loads only NumPy arrays "
            f"and plain containers from a pickle (this one could run code); {fix}"
        ) from None
    except Exception as err:  # a pickle that is not one: any error of the unpickler or NumPy
        why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ValueError(
            f"{where} is not a readable pickle ({why}): it is truncated or corrupt; {fix}"
        ) from None


def key(mapping: Mapping[Any, Any], name: str) -> Any:
    """``mapping[name]`` where the key may be ``str`` or ``bytes``; ``KeyError`` if neither, or if
    ``mapping`` is not a dict."""
    if not isinstance(mapping, dict):
        raise KeyError(name)
    if name in mapping:
        return mapping[name]
    return mapping[name.encode()]


def text(value: Any) -> str:
    """A name read from a pickle as ``str`` (``bytes``, as Python 2 strings may be, decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)
