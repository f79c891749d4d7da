"""Name registries: every teacher, objective and metric is found by the name a config uses."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A config named something that is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


TEACHERS: Registry = Registry("teacher")
OBJECTIVES: Registry = Registry("objective")
METRICS: Registry = Registry("metric")


def load_builtin() -> None:
    """Import the modules whose import registers the built-in teachers, objectives and metrics."""
    import onestep.evaluation.metrics  # noqa: F401
    import onestep.objectives  # noqa: F401
    import onestep.teachers  # noqa: F401
