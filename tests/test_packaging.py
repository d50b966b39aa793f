"""Packaging promises: the layout, the console script, and import names nobody else provides."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
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
