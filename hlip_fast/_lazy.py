"""Lazy package exports: ``import hlip_fast`` (and every command-line tool's ``--help``) stays
fast because torch and the modules that need it load on first use of a name."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` (a module
    path relative to ``package``) when ``name`` is first asked for."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list:
        return sorted(exports)

    return __getattr__, __dir__
