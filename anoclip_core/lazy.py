"""PEP 562 lazy public names for the project's packages (torch-free).

A package lists ``{public name: module}`` and gets a module ``__getattr__`` that imports the module
on first access and caches the value in the package namespace, so ``import runtime`` or
``import anoclip_core.transform`` does not pull in torch through an eager re-export.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` resolving the names of ``table`` on demand."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
