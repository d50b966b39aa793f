"""The compiled window module as this tree's ``gateway/_window.c`` builds: warning-free, and a failed init leaks nothing.

The source is compiled here with the interpreter's flags, the project's (pyproject.toml) and
``-Wall -Wextra -Werror``, so a warning fails the test rather than an install (where the module
is optional and a newer compiler must not stop it).  The init is made to fail part-way by an
import of a ``numpy`` without what it needs, in a child interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

from gateway import compiled

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "gateway" / "_window.c"
WARNINGS = ["-Wall", "-Wextra", "-Werror"]

# Each case imports the module three times with a numpy lacking what the init takes, then once
# with the real numpy: the objects the failed inits took must be back at their reference counts.
CHILD = textwrap.dedent(
    """
    import importlib.util, json, sys, types

    spec = importlib.util.spec_from_file_location("gateway._window", sys.argv[1])
    fakes = {
        # numpy.ndarray is not a type: the init has taken ndarray and empty when it finds out.
        "not_a_type": {"ndarray": object(), "empty": object()},
        # numpy.empty is missing: the init has taken ndarray.
        "no_empty": {"ndarray": type("ndarray", (), {})},
    }
    out = {}
    real = sys.modules.pop("numpy", None)
    for case, attrs in fakes.items():
        fake = types.ModuleType("numpy")
        for k, v in attrs.items():
            setattr(fake, k, v)
        sys.modules["numpy"] = fake
        before = {k: sys.getrefcount(v) for k, v in attrs.items()}
        errors = []
        for _ in range(3):
            try:
                importlib.util.module_from_spec(spec)
            except ImportError as e:
                errors.append(str(e))
        out[case] = {"taken": {k: sys.getrefcount(v) - before[k] for k, v in attrs.items()}, "errors": errors}
    del sys.modules["numpy"]
    import numpy
    module = importlib.util.module_from_spec(spec)
    out["version"] = module.VERSION
    out["vector"] = module.vector([1.0, 2.5]).tolist()
    print(json.dumps(out))
    """
)


def project_flags() -> list[str]:
    """The compile arguments pyproject.toml gives the module."""
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]
    (module,) = [m for m in modules if m["name"] == "gateway._window"]
    assert module["sources"] == ["gateway/_window.c"]
    return list(module["extra-compile-args"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree's module compiled as setuptools compiles it, every warning an error."""
    include = Path(sysconfig.get_paths()["include"])
    assert (include / "Python.h").is_file(), f"no Python.h in {include}: bash .ci/setup installs python3-dev"
    target = tmp_path_factory.mktemp("window") / f"_window{sysconfig.get_config_var('EXT_SUFFIX')}"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    flags = [
        *(sysconfig.get_config_var("CFLAGS") or "").split(),
        "-shared",
        "-fPIC",
        *project_flags(),
        *WARNINGS,
    ]
    result = subprocess.run(
        [*cc, *flags, f"-I{include}", str(SOURCE), "-o", str(target), "-lm"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"gateway/_window.c does not build with {' '.join(WARNINGS)}:\n{result.stderr}"
    )
    assert result.stderr == "", result.stderr
    return target


def test_a_failed_init_gives_back_what_it_took_and_a_later_one_succeeds(built: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(built)], capture_output=True, text=True, check=True, timeout=60
    )
    out = json.loads(result.stdout)
    assert out["not_a_type"]["taken"] == {"ndarray": 0, "empty": 0}
    assert out["no_empty"]["taken"] == {"ndarray": 0}
    for case in ("not_a_type", "no_empty"):
        assert out[case]["errors"] == ["gateway._window: numpy.ndarray or numpy.empty not found"] * 3, case
    # The pointers a failed init cleared are taken again: the module works.
    assert out["version"] == compiled.VERSION
    assert out["vector"] == [1.0, 2.5]
