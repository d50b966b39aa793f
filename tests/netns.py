"""A network namespace joined to this one by a veth pair, for network fault scenarios.

The broker runs inside the namespace (``wrapper``), the gateway outside; faults are applied to the
outer end of the pair: the link cut (``ip link set down``), and loss or latency with ``tc netem``
where the kernel has it.  Names and the /30 subnet derive from the process id; everything is
removed on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType
from typing import Self


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def why_unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"etp{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel refuses a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetNs:
    """``with NetNs() as ns``: a namespace at ``ns.inner_ip``, reached through ``ns.outer``."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"et{pid}"
        self.outer = f"et{pid}o"
        self.inner = f"et{pid}i"
        net = 16 + pid % 200
        sub = (pid // 200) % 60 * 4
        self.outer_ip = f"10.{net}.{sub}.1"
        self.inner_ip = f"10.{net}.{sub}.2"
        self.wrapper = ("ip", "netns", "exec", self.name)

    def __enter__(self) -> Self:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            _ip("link", "set", self.inner, "netns", self.name)
            _ip("addr", "add", f"{self.outer_ip}/30", "dev", self.outer)
            _ip("link", "set", self.outer, "up")
            _ip("-n", self.name, "addr", "add", f"{self.inner_ip}/30", "dev", self.inner)
            _ip("-n", self.name, "link", "set", self.inner, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _ip("link", "del", self.outer, check=False)
        _ip("netns", "del", self.name, check=False)

    def cut(self) -> None:
        """Take the link down: packets are lost both ways, nothing is refused."""
        _ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        """Bring the link back up."""
        _ip("link", "set", self.outer, "up")

    def netem(self, *spec: str) -> str | None:
        """Apply ``tc qdisc ... netem <spec>`` on the outer end; the kernel's refusal, or None."""
        if shutil.which("tc") is None:
            return "tc (iproute2) is not installed"
        done = subprocess.run(
            ["tc", "qdisc", "add", "dev", self.outer, "root", "netem", *spec],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return None if done.returncode == 0 else f"tc netem refused: {done.stderr.strip()}"
