"""Run a benchmark as on a Pi-class core: pinned to one CPU, under a CPU quota.

Usage, from the repository (root, for the cgroup)::

    .venv/bin/python tests/benchmarks/pi_profile.py [--quota 0.35] [--cpu 0] -- \
        .venv/bin/python tests/benchmarks/bench_pipeline.py

The command and everything it starts (the benchmark's broker and servers too, so the baseline
shares the budget with what it is compared against) run in a cgroup of their own with the CPU
bandwidth limit ``quota`` x one CPU (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), and on one
CPU (``sched_setaffinity``).  The default 0.35 approximates one Cortex-A72 core of a Raspberry Pi 4
at 1.5 GHz against one core of the 2-vCPU EPYC VM the figures in BENCHMARKS.md come from
(pyperformance-style pure-Python loops run ~3x slower there); it is an approximation, stated as
such, not a Pi.  Where no cgroup can be made (not root, a read-only hierarchy) the command runs
pinned only, and the script says so.  The cgroup is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _v2_dir(name: str) -> Path | None:
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    if "cpu" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
        return None
    return CGROUP_ROOT / name


def _v1_dir(name: str) -> Path | None:
    cpu = CGROUP_ROOT / "cpu"
    return cpu / name if (cpu / "cpu.cfs_quota_us").exists() else None


def _make(name: str, quota: float) -> tuple[Path | None, Path | None, str]:
    """(cgroup dir, its procs file, description); (None, None, why not) when none can be made."""
    limit = round(quota * PERIOD_US)
    made: Path | None = None
    try:
        v2 = _v2_dir(name)
        if v2 is not None:
            made = v2
            v2.mkdir()
            (v2 / "cpu.max").write_text(f"{limit} {PERIOD_US}\n")
            return v2, v2 / "cgroup.procs", f"cgroup v2 cpu.max {limit}/{PERIOD_US} us"
        v1 = _v1_dir(name)
        if v1 is not None:
            made = v1
            v1.mkdir()
            (v1 / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (v1 / "cpu.cfs_quota_us").write_text(f"{limit}\n")
            return v1, v1 / "cgroup.procs", f"cgroup v1 cpu.cfs_quota_us {limit}/{PERIOD_US} us"
    except OSError as exc:
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()
        return None, None, f"cannot make a cgroup ({exc.strerror or exc})"
    return None, None, "no cgroup cpu controller here"


@contextlib.contextmanager
def cpu_limited(quota: float) -> Iterator[tuple[Path | None, str]]:
    """A fresh cgroup limited to ``quota`` of one CPU: (its procs file, description), or (None, why not)."""
    made, procs, how = _make(f"edgetwin-bench-{os.getpid()}", quota)
    try:
        yield procs, how
    finally:
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()


def main() -> int:
    """Run the command after ``--`` pinned to one CPU under the quota; return its exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quota", type=float, default=0.35, help="share of one CPU (default 0.35)")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (default 0)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark's command line")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give it after --")
    if not 0.01 <= args.quota <= 1.0:
        parser.error(f"--quota {args.quota}: expected a share of one CPU between 0.01 and 1")
    with cpu_limited(args.quota) as (procs, how):
        print(f"pi profile: CPU {args.cpu} only; {how}", file=sys.stderr, flush=True)
        if procs is None:
            print("pi profile: pinned only, no quota: the figures are of a full core", file=sys.stderr)

        def enter() -> None:
            os.sched_setaffinity(0, {args.cpu})
            if procs is not None:
                procs.write_text(f"{os.getpid()}\n")

        # The cgroup must be empty to be removed: the command is waited for before leaving.
        return subprocess.run(command, preexec_fn=enter, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
