"""Name -> builder registries filled by decorators (torchdistill style), and module discovery.

A registry's package imports every module in its folder (``import_submodules``),
so a new method, backbone or dataset is one new file with a decorator: no other
file lists it. An entry carries its own metadata (keyword arguments of
``register``: a method's table title, a dataset's size), so no other file keeps
a list about it either. An unknown name says where a new entry would go.

A file of a registry's folder that fails to import (a syntax error, a missing
import, a registration that breaks the contract) is a user's mistake like a
wrong YAML key: the registry keeps a ``PluginError`` naming the file and line
and raises it on its first use, where every command reports it in one line and
exits with status 2 (an import-time error would escape their error handling).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Generic, Iterable, Iterator, List, Optional, TypeVar

from .errors import ConfigError, OkdError

T = TypeVar("T")


class PluginError(OkdError):
    """A file of a registry's folder that cannot be imported, located by file and line."""


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' suffix for the nearest valid choice, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def import_submodules(package: str, path: Iterable[str], registry: Optional["Registry"] = None) -> None:
    """Import every module of a package folder (registration side effects). A module that fails is a
    ``PluginError``: kept by ``registry`` (raised on its first use), raised here without one."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - whatever a broken file raises, it is reported the same way
            error = plugin_error(exc, module_file(info), registry.kind if registry is not None else "module")
            if registry is None:
                raise error from exc
            error.__cause__ = exc
            registry.broken.append(error)


def module_file(info: pkgutil.ModuleInfo) -> Path:
    folder = Path(getattr(info.module_finder, "path", "."))
    return folder / info.name / "__init__.py" if info.ispkg else folder / f"{info.name}.py"


def plugin_error(exc: BaseException, path: Path, kind: str) -> PluginError:
    """'broken <kind> file FILE:LINE: what went wrong': the line of ``path`` the failure came from (for a
    registration, its decorator's), or the syntax error's own."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line = frames[-1].lineno if frames else None
    what = str(exc).splitlines()[0] if str(exc) else ""
    what = what if isinstance(exc, OkdError) else f"{type(exc).__name__}: {what}" if what else type(exc).__name__
    return PluginError(f"broken {kind} file {path}{f':{line}' if line else ''}: {what}; fix the file or move it out "
                       f"of {path.parent}/")


class Registry(Generic[T]):
    """``kind`` names what it holds; ``hint`` says how to add an entry (shown for unknown names)."""

    def __init__(self, kind: str, hint: str = "", on_register: Optional[Callable[[str, T, Dict[str, Any]], None]] = None):
        self.kind = kind
        self.hint = hint
        self.on_register = on_register
        self._entries: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}
        self.broken: List[PluginError] = []  # files of the registry's folder that failed to import

    def check(self) -> None:
        """Raise the first broken file's error: a registry missing a file's entries must not be used."""
        if self.broken:
            raise self.broken[0]

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
        self.check()
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
        self.check()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.check()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
