"""Name -> builder registries filled by decorators (torchdistill style), and module discovery.

A registry's package imports every module in its folder (``import_submodules``),
so a new method, backbone or dataset is one new file with a decorator: no other
file lists it. An entry carries its own metadata (keyword arguments of
``register``: a method's table title, a dataset's size), so no other file keeps
a list about it either. An unknown name says where a new entry would go.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Dict, Generic, Iterable, Iterator, Optional, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' suffix for the nearest valid choice, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package folder (registration side effects)."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """``kind`` names what it holds; ``hint`` says how to add an entry (shown for unknown names)."""

    def __init__(self, kind: str, hint: str = "", on_register: Optional[Callable[[str, T, Dict[str, Any]], None]] = None):
        self.kind = kind
        self.hint = hint
        self.on_register = on_register
        self._entries: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str, *aliases: str, **meta: Any) -> Callable[[T], T]:
        """``@REGISTRY.register("name", "alias", key=value, ...)``; ``meta(name)`` returns the keywords."""
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} '{key}' registered twice")
            if self.on_register is not None:
                self.on_register(name, obj, meta)
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def canonical(self, name: str) -> str:
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        valid = sorted(self._entries)
        hint = f"; {self.hint.format(name=name)}" if self.hint else ""
        raise ConfigError(
            f"unknown {self.kind} '{name}'{closest(name, valid + sorted(self._aliases))}; "
            f"valid: {', '.join(valid)}{hint}"
        )

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def meta(self, name: str) -> Dict[str, Any]:
        """The keywords ``name`` (or an alias of it) was registered with."""
        return dict(self._meta[self.canonical(name)])

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
