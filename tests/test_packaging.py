"""Packaging promises: the layout, the console script, and import names nobody else provides."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import gateway

ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("gateway", "drivers", "firmware_bridge", "models")


def test_layout() -> None:
    for name in ("gateway", "drivers", "models", "firmware_bridge", "systemd", "tests"):
        assert (ROOT / name).is_dir(), name
    for name in ("pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / name).is_file(), name


def test_no_other_distribution_provides_our_import_names() -> None:
    # gateway/drivers are generic names: another package shipping them would shadow ours.
    providers = importlib.metadata.packages_distributions()
    for name in OUR_PACKAGES:
        assert set(providers.get(name, ["edgetwin"])) <= {"edgetwin"}, (name, providers.get(name))


def test_version_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == f"edgetwin {gateway.__version__}"


def test_usage_error_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash .ci/setup test && .venv/bin/python -m pytest"
    assert command in readme
    assert command in ci


def test_license_is_an_spdx_expression_with_its_text_shipped() -> None:
    # PEP 639: setuptools refuses the table form (license = { text = ... }) from 2027-02-18.  The
    # wheel and sdist builds themselves need the build backend from a package index, so they are
    # checked by hand (pip wheel / python -m build); here, what they are built from and the
    # metadata of this checkout's install.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    # The first setuptools that reads both fields.
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.fullmatch(r"setuptools>=(\d+)", setuptools), setuptools
    assert int(setuptools.split(">=")[1]) >= 77
    # A license classifier beside an expression is refused by PEP 639 builds.
    assert not [c for c in pyproject["project"].get("classifiers", []) if c.startswith("License ::")]
    metadata = importlib.metadata.metadata("edgetwin")
    assert metadata["License-Expression"] == "Apache-2.0", (
        "the install predates pyproject.toml: bash .ci/setup"
    )
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None


def test_the_wheel_leaves_out_the_compiled_module_source() -> None:
    # The sdist carries gateway/_window.c (an ext-module source); a wheel holds the built module.
    # The node's firmware sources stay package data: the simulated node is built on first use.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["exclude-package-data"]["gateway"] == ["_window.c"]
    assert "firmware/*.c" in setuptools["package-data"]["firmware_bridge"]
