"""A package's public names imported from their submodules on first use (PEP 562)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any


def lazy_name(package: str, home: Mapping[str, str], name: str) -> Any:
    """``package.name`` imported from the submodule ``home`` names, kept in the package once loaded."""
    submodule = home.get(name)
    if submodule is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
    setattr(sys.modules[package], name, value)
    return value
