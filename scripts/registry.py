"""Registries of named pipeline parts (in the style of lm-evaluation-harness): methods
(scripts/pipeline/methods.py), pair rules (scripts/pairs/) and serving backends (scripts/pipeline/backends.py).

Each part registers itself, once, with everything the rest of the code needs to know about it (its flags, its
defaults, how settings become its arguments); the code that uses parts asks the registry by name instead of
comparing names. A registry imports its built-in modules the first time it is asked, so registering is a side
effect of importing a module, and a module outside the package registers the same way: import it (the pair
builder's `--plugin MODULE` imports one in its own process; the pipeline passes it along, see scripts/pairs/rule.py).
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterable, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class UnknownName(ValueError):
    """A name no module registered; the message lists the registered ones."""


class Registry(Generic[T]):
    def __init__(self, what: str, builtin: Callable[[], Iterable[str]]):
        """`what` names an entry in messages ("pair rule"); `builtin()` gives the modules that register the
        built-in entries, imported on first use (a function, so that a package can list its own folder)."""
        self.what, self._builtin = what, builtin
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}
        self._loaded = False

    def register(self, entry: T, module: str) -> T:
        """Register `entry` under its name, from the importable module `module` (the caller's `__name__`).
        Registering a name again from the same module (a module imported twice) replaces it; from another,
        refuses."""
        self._ensure_builtin()  # the built-in entries come first, in their modules' order, whoever registers first
        name = entry.name
        if self._modules.get(name, module) != module:
            raise ValueError(f"{self.what} {name!r} is registered by {self._modules[name]} already")
        self._entries[name], self._modules[name] = entry, module
        return entry

    def unregister(self, name: str) -> None:
        """Undo a registration (a test's toy entry, once the test is over)."""
        self._entries.pop(name, None)
        self._modules.pop(name, None)

    def load(self, module: str) -> None:
        """Import a module that registers entries (a plugin, or a built-in one)."""
        importlib.import_module(module)

    def _ensure_builtin(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin():
                self.load(module)

    # the registry as the collection of its names: `name in METHODS`, ", ".join(METHODS), choices=METHODS
    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> T:
        self._ensure_builtin()
        if name not in self._entries:
            raise UnknownName(f"no {self.what} {name!r}; {self.what}s: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_builtin()
        return list(self._entries)

    def entries(self) -> dict[str, T]:
        self._ensure_builtin()
        return dict(self._entries)

    def module_of(self, name: str) -> str:
        """The module that registered `name` (for another process to import)."""
        self.get(name)
        return self._modules[name]

    def is_builtin(self, name: str) -> bool:
        return self.module_of(name) in set(self._builtin())
