"""The import deferral asyncua's client modules are served with: what it defers, what it refuses."""

from __future__ import annotations

import ast
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from drivers.opcua.defer import HOLDER, Deferred, rewrite

# A package of our own standing in for a heavy library: importing ``heavy.part`` is recorded.
HEAVY = {
    "heavy/__init__.py": "",
    "heavy/part.py": "import sys\nsys.modules['heavy'].loads = getattr(sys.modules['heavy'], 'loads', 0) + 1\n"
    "class Thing:\n    pass\n\ndef make():\n    return Thing()\n",
    "heavy/sub.py": "VALUE = 7\n",
}


@pytest.fixture
def heavy(tmp_path: Path) -> Iterator[Path]:
    for name, text in HEAVY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "heavy" or m.startswith("heavy.")]:
            del sys.modules[name]


def run(source: str, packages: tuple[str, ...] = ("heavy",)) -> ModuleType:
    """The module ``source`` rewritten and executed as ``pkg.mod``."""
    done = rewrite(ast.parse(textwrap.dedent(source)), "pkg", packages)
    assert done is not None
    module = ModuleType("pkg.mod")
    module.__dict__[HOLDER] = Deferred(done.sources)
    exec(compile(done.tree, "<pkg.mod>", "exec", dont_inherit=True), module.__dict__)
    return module


def loads() -> int:
    return int(getattr(sys.modules.get("heavy"), "loads", 0))


@pytest.mark.usefixtures("heavy")
def test_names_are_imported_on_first_use_and_annotations_do_not_import_them() -> None:
    module = run(
        """
        from heavy.part import Thing, make
        from heavy import sub

        def build(kind: Thing | None = None) -> Thing:
            return make()

        class Holder:
            item: Thing

        def value() -> int:
            return sub.VALUE
        """
    )
    assert loads() == 0  # defined, annotated, nothing imported
    assert build_is_thing(module)
    assert loads() == 1
    assert module.value() == 7
    assert module.build.__annotations__["return"] == f"{HOLDER}.Thing"


def build_is_thing(module: ModuleType) -> bool:
    thing = module.build()
    return type(thing).__name__ == "Thing" and isinstance(thing, sys.modules["heavy.part"].Thing)


@pytest.mark.usefixtures("heavy")
def test_a_name_replaced_at_the_top_level_before_use_is_not_imported_at_all() -> None:
    module = run(
        """
        from heavy.part import Thing

        class Thing(Exception):
            pass

        def fail():
            raise Thing("ours")
        """
    )
    with pytest.raises(Exception, match="ours") as info:
        module.fail()
    assert type(info.value).__module__ != "heavy.part"
    assert loads() == 0


@pytest.mark.parametrize(
    "source",
    [
        # a parameter of the same name: reading it through the holder would change the function
        "from heavy.part import Thing\ndef f(Thing):\n    return Thing\n",
        # a method of the same name in a class (asyncua's Client.delete_nodes beside the function)
        "from heavy.part import make\nclass C:\n    def make(self):\n        return make()\n",
        # used before a top-level statement replaces it
        "from heavy.part import Thing\nx = Thing\nclass Thing:\n    pass\n",
        "from heavy.part import *\n",
        # a name the holder has itself
        "from heavy.part import names\n",
    ],
)
def test_unsafe_rewrites_are_refused(source: str) -> None:
    assert rewrite(ast.parse(source), "pkg", ("heavy",)) is None


def test_only_the_named_packages_and_submodules_are_deferred() -> None:
    source = "from heavyweight import a\nfrom . import light, heavy\nfrom .other import b\n"
    done = rewrite(ast.parse(source), "pkg", ("heavyweight", "pkg.heavy"))
    assert done is not None
    assert done.sources == {"a": ("heavyweight", "a"), "heavy": ("pkg", "heavy")}
    assert ast.unparse(done.tree) == "from . import light\nfrom .other import b"
    assert rewrite(ast.parse("import os\n"), "pkg", ("heavy",)) is None  # nothing to defer
