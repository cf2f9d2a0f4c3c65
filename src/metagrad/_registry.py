"""Registries: the single list of what exists (algorithms, inner solvers, models, benchmarks).

Each entry holds its name, its builder, the config fields it reads (``options``: builder keyword
-> config field name), a one-line help text and, for an algorithm, its presets. The config's
choices and the command line's flags are derived from the registries; nothing else lists names.

>>> from metagrad.algorithms import ALGORITHMS
>>> "maml" in ALGORITHMS.names()
True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: ``build(**kwargs) -> T`` and the config fields it reads.

    ``options`` maps a keyword of ``build`` to the config field that supplies it, e.g.
    ``{"lam": "lam", "metric": "leap_metric"}``. ``presets`` maps a preset name to
    ``(flat config overrides, source)``.
    """

    name: str
    build: Callable[..., T]
    options: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    presets: Mapping[str, tuple[Mapping[str, Any], str]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> :class:`Entry`, in registration order; ``kind`` names it in error messages.

    Read like a mapping: ``names in registry``, ``registry[name]``, ``for name in registry``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        build: Callable[..., T],
        *,
        options: Mapping[str, str] | None = None,
        help: str = "",
        presets: Mapping[str, tuple[Mapping[str, Any], str]] | None = None,
        **extra: Any,
    ) -> Entry[T]:
        """Add ``name``; ``ValueError`` if it is taken (names are unique within a registry)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered: choose another name")
        entry = Entry(name, build, dict(options or {}), help, dict(presets or {}), extra)
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def get(self, name: str) -> Entry[T]:
        """The entry ``name``; ``ValueError`` naming the choices (and the closest) if unknown."""
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint}: choose one of {', '.join(self._entries)}"
            )
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """``get(name).build(*args, **kwargs)``."""
        return self.get(name).build(*args, **kwargs)

    def options(self) -> set[str]:
        """Every config field that some entry reads."""
        return {f for e in self._entries.values() for f in e.options.values()}

    def entries(self) -> tuple[Entry[T], ...]:
        """Every entry, in registration order."""
        return tuple(self._entries.values())

    def __getitem__(self, name: str) -> Entry[T]:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
