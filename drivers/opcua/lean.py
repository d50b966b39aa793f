"""asyncua for a client: its package imported without its server, which loads on first use of ``asyncua.Server``.

asyncua's ``__init__`` imports ``Server`` for every user of the package, and any submodule import
(``asyncua.client.client``, ``asyncua.ua``) runs that ``__init__`` first: a gateway that only reads
OPC UA servers would hold the server's session, subscription, history and address-space modules
(~2 MB resident) for nothing.  :func:`install` puts a finder first on ``sys.meta_path`` that serves
the package with the same names, ``Server`` resolved by the module's ``__getattr__`` (PEP 562) when
something asks for it.  It acts only on the ``__init__`` it knows (asyncua 2.1's, compared as
syntax trees); any other version is imported as it is.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = "asyncua"

# asyncua's ``__init__`` as released (2.1.0): the names it gives, in this order (common first:
# its submodules import each other through the package).
_KNOWN_INIT = '''\
"""
Pure Python OPC-UA library
"""

import sys
from importlib import metadata

__version__ = metadata.version("asyncua")

from .common import Node, uamethod
from .client import Client
from .server import Server
'''


@functools.cache
def _known_tree() -> str:
    return ast.dump(ast.parse(_KNOWN_INIT))


def is_known_init(path: Path) -> bool:
    """True when ``path`` is the asyncua ``__init__`` this module replaces (same syntax tree)."""
    try:
        return ast.dump(ast.parse(path.read_text(encoding="utf-8"))) == _known_tree()
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False


def _server_on_first_use(name: str) -> Any:
    # The package's module-level __getattr__: only names missing from its namespace arrive here.
    if name != "Server":  # before any lookup, so hasattr() stays False for every other name
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
    server = importlib.import_module(f"{PACKAGE}.server").Server
    sys.modules[PACKAGE].Server = server  # type: ignore[attr-defined]
    log.debug("asyncua's server imported on first use")
    return server


class _ClientFirst(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``asyncua`` where the path finder does and runs its ``__init__``'s imports but the server's."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,  # noqa: ARG002 - the finder protocol's signature
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not is_known_init(Path(spec.origin)):
            return None  # not there, or another release: the normal import
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:  # noqa: ARG002 - the loader protocol's
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        module.sys = sys  # type: ignore[attr-defined]  # the names the original leaves, all of them
        module.metadata = metadata  # type: ignore[attr-defined]
        module.__version__ = metadata.version(PACKAGE)  # type: ignore[attr-defined]
        common = importlib.import_module(f"{PACKAGE}.common")
        module.Node = common.Node  # type: ignore[attr-defined]
        module.uamethod = common.uamethod  # type: ignore[attr-defined]
        module.Client = importlib.import_module(f"{PACKAGE}.client").Client  # type: ignore[attr-defined]
        module.__getattr__ = _server_on_first_use  # type: ignore[method-assign]


_FINDER = _ClientFirst()


def install() -> None:
    """Serve asyncua without its server from now on (no effect on a package already imported)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def served() -> bool:
    """True when the imported asyncua package came through :func:`install`'s finder."""
    package = sys.modules.get(PACKAGE)
    return package is not None and getattr(package.__spec__, "loader", None) is _FINDER


__all__ = ["PACKAGE", "install", "is_known_init", "served"]
