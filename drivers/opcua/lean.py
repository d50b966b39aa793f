"""asyncua for a client: its package imported without its server, which loads on first use of ``asyncua.Server``.

asyncua's ``__init__`` imports ``Server`` for every user of the package, and any submodule import
(``asyncua.client.client``, ``asyncua.ua``) runs that ``__init__`` first: a gateway that only reads
OPC UA servers would hold the server's session, subscription, history and address-space modules
(~2 MB resident) for nothing.  :func:`install` puts a finder first on ``sys.meta_path`` that serves
the package with the same names, ``Server`` resolved by the module's ``__getattr__`` (PEP 562) when
something asks for it.  It acts only on the ``__init__`` it knows (asyncua 2.1's, compared as
syntax trees); any other version is imported as it is.

The same finder serves three of asyncua's modules with their imports of ``cryptography`` (its
Rust library and x509, ~8 MB resident), ``dateutil`` and the client's certificate, validator and
XML modules deferred to first use (:mod:`drivers.opcua.defer`): a client without a security
policy never loads them.  Each is rewritten only when its source is the one reviewed here
(asyncua 2.1.0's, by SHA-256); any other is imported as it is.
"""

from __future__ import annotations

import ast
import functools
import hashlib
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

from drivers.opcua.defer import HOLDER, Deferred, rewrite

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


# asyncua 2.1.0's modules rewritten with some imports deferred: SHA-256 of the source, and the
# packages and modules whose imports wait for first use.  Each rewrite was checked by hand: no
# deferred name is read at import time, so none of them loads with the client.
DEFERRED: dict[str, tuple[str, tuple[str, ...]]] = {
    f"{PACKAGE}.client.client": (
        "f9ccf1ee491fafad84158e375a7cb7ad482dd58b9c9ee1d66de4bb3d954eabf8",
        (
            "cryptography",
            f"{PACKAGE}.crypto.cert_gen",
            f"{PACKAGE}.crypto.validator",
            f"{PACKAGE}.common.xmlimporter",
            f"{PACKAGE}.common.xmlexporter",
        ),
    ),
    f"{PACKAGE}.crypto.uacrypto": (
        "f7ec22d292edde53e4998f48f4c3702d8107826bb8123761825cb73963bbe04a",
        ("cryptography",),
    ),
    f"{PACKAGE}.common.ua_utils": (
        "9327ab50f571e4d30d2f311893644580aa98da6a21043675fcc15e6fe63530a6",
        ("dateutil",),
    ),
}


@functools.cache
def _known_tree() -> str:
    return ast.dump(ast.parse(_KNOWN_INIT))


def is_known_init(path: Path) -> bool:
    """True when ``path`` is the asyncua ``__init__`` this module replaces (same syntax tree)."""
    try:
        return ast.dump(ast.parse(path.read_text(encoding="utf-8"))) == _known_tree()
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False


def deferring_code(fullname: str, path: Path) -> tuple[Any, dict[str, tuple[str, str]]] | None:
    """The code of ``fullname`` at ``path`` with its :data:`DEFERRED` imports deferred; None if not the known source."""
    digest, packages = DEFERRED[fullname]
    try:
        source = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(source).hexdigest() != digest:
        return None
    done = rewrite(ast.parse(source, str(path)), fullname.rpartition(".")[0], packages)
    if done is None:
        return None
    return compile(done.tree, str(path), "exec", dont_inherit=True), done.sources


class _DeferringLoader(importlib.abc.Loader):
    """Runs a rewritten module: its deferred names read through a :class:`Deferred` in its globals."""

    def __init__(self, code: Any, sources: dict[str, tuple[str, str]]) -> None:
        self.code = code
        self.sources = sources

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:  # noqa: ARG002 - the loader protocol's
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        holder = Deferred(self.sources)
        module.__dict__[HOLDER] = holder

        def deferred_attribute(name: str) -> Any:
            # Another module's ``from asyncua.crypto.uacrypto import x509`` still finds the name.
            if name not in holder.names():
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
            return getattr(holder, name)

        module.__getattr__ = deferred_attribute  # type: ignore[method-assign]
        exec(self.code, module.__dict__)  # noqa: S102 - asyncua's own code, rewritten as reviewed above


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
        if fullname in DEFERRED:
            return self._deferring_spec(fullname, path)
        if fullname != PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not is_known_init(Path(spec.origin)):
            return None  # not there, or another release: the normal import
        spec.loader = self
        return spec

    @staticmethod
    def _deferring_spec(fullname: str, path: Sequence[str] | None) -> importlib.machinery.ModuleSpec | None:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        code = deferring_code(fullname, Path(spec.origin))
        if code is None:
            return None  # another release: the normal import
        spec.loader = _DeferringLoader(*code)
        spec.cached = None
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


def deferred() -> list[str]:
    """The imported modules of :data:`DEFERRED` that were served rewritten."""
    return sorted(
        name
        for name in DEFERRED
        if isinstance(
            getattr(getattr(sys.modules.get(name), "__spec__", None), "loader", None), _DeferringLoader
        )
    )


__all__ = ["DEFERRED", "PACKAGE", "deferred", "deferring_code", "install", "is_known_init", "served"]
