"""Module-level ``from X import name`` statements turned into imports on first use, as a syntax-tree rewrite.

asyncua's client modules import ``cryptography`` (its Rust library and x509: ~8 MB resident) and
``dateutil`` at module level, although a client without a security policy never calls them.
:func:`rewrite` takes such a module's syntax tree and the packages to defer, drops those imports
and reads every use of their names through one :class:`Deferred` object of the module's, which
imports each name when it is first read.  Annotations that mention them become strings (as under
``from __future__ import annotations``), so defining a function does not import them either.

The rewrite is refused (``None``) when a deferred name is bound anywhere else in the module (a
parameter, a local, a method of the same name), except by a top-level statement that replaces it
before any use: reading it through the object there would change what the code means.  Uses that
run at import time (a default value, a decorator, a module-level expression) still import the
name then: correct, only not deferred.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The global through which a rewritten module reads its deferred names.
HOLDER = "_deferred_imports"


class Deferred:
    """The names a module imports on first use: ``local -> (module, name)``, each resolved once."""

    def __init__(self, sources: dict[str, tuple[str, str]]) -> None:
        self._sources = sources

    def __getattr__(self, local: str) -> Any:
        try:
            module, name = self._sources[local]
        except KeyError:
            raise AttributeError(local) from None
        imported = importlib.import_module(module)
        try:
            value = getattr(imported, name)
        except AttributeError:  # a submodule not imported yet, as ``from package import sub`` does
            value = importlib.import_module(f"{module}.{name}")
        setattr(self, local, value)  # later reads are a plain attribute
        return value

    def names(self) -> frozenset[str]:
        """The deferred names, imported or not."""
        return frozenset(self._sources)


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A module's tree with its deferred imports taken out, and where each name comes from."""

    tree: ast.Module
    sources: dict[str, tuple[str, str]]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _deferred(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _bindings(tree: ast.AST) -> set[str]:
    """Every name bound anywhere in ``tree``: assigned, defined, a parameter, caught, imported, declared."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            found.add(node.name)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            found.update(node.names)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            found.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
    return found


def _mentions(tree: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(tree))


class _Reader(ast.NodeTransformer):
    """Reads the deferred names through the holder; annotations that mention them become strings."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.names and isinstance(node.ctx, ast.Load):
            holder = ast.copy_location(ast.Name(HOLDER, ast.Load()), node)
            return ast.copy_location(ast.Attribute(holder, node.id, ast.Load()), node)
        return node

    def _annotation(self, node: ast.expr | None) -> ast.expr | None:
        if node is None or not _mentions(node, self.names):
            return node
        return ast.copy_location(ast.Constant(ast.unparse(self.visit(node))), node)

    def _arguments(self, args: ast.arguments) -> None:
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is not None:
                a.annotation = self._annotation(a.annotation)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self._arguments(node.args)
        node.returns = self._annotation(node.returns)
        return self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self._arguments(node.args)
        node.returns = self._annotation(node.returns)
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        node.annotation = self._annotation(node.annotation) or node.annotation
        return self.generic_visit(node)


def rewrite(tree: ast.Module, package: str, packages: Iterable[str]) -> Rewritten | None:
    """``tree`` (a module of ``package``) with its top-level imports from ``packages`` deferred; None if unsafe."""
    packages = tuple(packages)
    sources: dict[str, tuple[str, str]] = {}
    body: list[ast.stmt] = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.ImportFrom):
            body.append(stmt)
            continue
        base = _absolute(stmt, package)
        if any(a.name == "*" for a in stmt.names):
            if _deferred(base, packages):
                return None
            body.append(stmt)
            continue
        # The module itself deferred, or some of its names that are deferred submodules
        # (``from ..crypto import cert_gen, uacrypto``).
        moved = [
            a for a in stmt.names if _deferred(base, packages) or _deferred(f"{base}.{a.name}", packages)
        ]
        sources.update({a.asname or a.name: (base, a.name) for a in moved})
        kept = [a for a in stmt.names if a not in moved]
        if kept:
            body.append(
                stmt if not moved else ast.copy_location(ast.ImportFrom(stmt.module, kept, stmt.level), stmt)
            )
    if not sources:
        return None
    # A name bound again at the top level before any use (asyncua's own ``InvalidSignature``
    # class replacing the imported one) was never read from the import: drop it, do not defer it.
    for index, stmt in enumerate(body):
        for name in [n for n in sources if _top_level_binding(stmt, n)]:
            if any(_mentions(earlier, {name}) for earlier in body[:index]):
                return None
            del sources[name]
    if _bindings(ast.Module(body, [])) & set(sources):
        return None
    if set(sources) & {*dir(Deferred), "_sources"}:  # read as the holder's own attribute, not imported
        return None
    names = set(sources)
    module = ast.Module([_Reader(names).visit(stmt) for stmt in body], tree.type_ignores)
    return Rewritten(ast.fix_missing_locations(module), sources)


def _top_level_binding(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return stmt.name == name
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    return False


__all__ = ["HOLDER", "Deferred", "Rewritten", "rewrite"]
