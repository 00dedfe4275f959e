"""One registry mechanism for every pluggable part of ptlab (selection strategies, transfer adapters,
recipes, report renderers).

An entry is an object or a lazy ``"module:attribute"`` reference, resolved on first use, so a registry
can list its names (for the config schema and for error messages) without importing the heavy
libraries its entries need. Names keep their registration order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no entry of the registry has; the message names the key and the allowed values."""


class Registry(Generic[T]):
    """Named entries of one kind; ``key`` is the config key whose values they are (for messages)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T | str] = {}

    def add(self, name: str, entry: T | str) -> None:
        """Register ``entry`` (an object or a ``"module:attribute"`` reference) as ``name``."""
        self._entries[name] = entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def wrap(entry: T) -> T:
            self.add(name, entry)
            return entry

        return wrap

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, name: str) -> T:
        """The entry ``name`` (imported now if it is a reference); ``UnknownName`` listing the names."""
        if name not in self._entries:
            raise UnknownName(f"{self.key}={name!r} is not allowed: must be one of {', '.join(self._entries)}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[str, T]]:
        """Every ``(name, entry)``, resolving references in registration order."""
        for name in list(self._entries):
            yield name, self.get(name)
