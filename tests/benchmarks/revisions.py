"""A module of this repository as it was at another git revision, for before/after benchmarks."""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def module_at(rev: str, path: str) -> ModuleType:
    """``path`` (e.g. "gateway/pipeline/windows.py") at ``rev``, imported as a module of its own.

    Its imports resolve to today's tree: only this one file is the old one.
    """
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = Path(path).stem + "_before"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def alternate(designs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each design's figure from ``rounds`` rounds, every round running them all in turn (ratios hold under load)."""
    times: dict[str, list[float]] = {name: [] for name in designs}
    for _ in range(rounds):
        for name, measure in designs.items():
            times[name].append(measure())
    return times


def print_ratios(times: Mapping[str, list[float]], base: str, column: str, digits: int = 1) -> None:
    """A Markdown table of each design's median and its ratio to ``base``'s median."""
    ref = statistics.median(times[base])
    print(f"| windower | {column} | vs before |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.{digits}f} | {m / ref:.2f}x |")
