"""Name registries: every teacher, objective, metric and exporter is found by the name a config uses.

A registry depends on nothing it holds: the built-in entries register themselves when their package is
imported, and a registry imports that package (by name) the first time it is asked for an entry. So
``onestep.registry`` sits below the teachers and objectives, and a user's own entries register the same way
(``@OBJECTIVES.register("mine")`` in any module imported before the config is validated).
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from onestep.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin: str | None = None):
        self.kind = kind
        self.builtin = builtin  # the package whose import registers the built-in entries
        self._entries: dict[str, T] = {}
        self._builtin_loaded = builtin is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def load_builtin(self) -> None:
        if not self._builtin_loaded:
            self._builtin_loaded = True  # first, so that lookups made while the package imports do not recurse
            importlib.import_module(self.builtin)

    def get(self, name: str) -> T:
        self.load_builtin()
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.load_builtin()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self.load_builtin()
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        self.load_builtin()
        return name in self._entries


TEACHERS: Registry = Registry("teacher", builtin="onestep.teachers")
OBJECTIVES: Registry = Registry("objective", builtin="onestep.objectives")
METRICS: Registry = Registry("metric", builtin="onestep.evaluation.metrics")
#: `scratch:<backbone>` (teacher-free runs) or a teacher name -> `onestep.export.Exporter` class (or "module:Class");
#: a teacher family's own exporter is named by its class's `exporter` hook instead
EXPORTERS: Registry = Registry("exporter", builtin="onestep.export.scratch")


def load_builtin() -> None:
    """Register every built-in teacher, objective, metric and exporter now (lookups do it on first use anyway)."""
    for registry in (TEACHERS, OBJECTIVES, METRICS, EXPORTERS):
        registry.load_builtin()
