"""A name -> builder registry, so adding a model or dataset is one decorated function."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vision_tl.core.errors import ConfigError
from vision_tl.core.validate import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; duplicate names raise, unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise KeyError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator form of `add`; the entry's `__name__` is the default name."""

        def decorator(entry: T) -> T:
            return self.add(name or entry.__name__, entry)  # type: ignore[attr-defined]

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            hint = did_you_mean(str(name), self.names())
            raise ConfigError(f"unknown {self.kind} '{name}'; available: {known}{hint}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
