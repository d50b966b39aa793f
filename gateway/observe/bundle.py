"""``edgetwin support-bundle``: one archive a technician can send, with no secret and no identity in it.

What goes in: versions (edgetwin, Python, every installed distribution, OS, kernel), the output
of ``check --online``, the running gateway's status, recent logs, the config with secret values
removed, outbox statistics (never records), the unit file and its systemd hardening score.

What never goes in: the content of any secret file (keys, passwords, tokens, the site key), and
any identity the config names (gateway name, source names, subjects, device addresses, ports,
endpoints, the host name).  Every text is passed through one :class:`Redactor` that replaces
each identity with its keyed pseudonym, longest first, case-blind; secret-looking keys' values
are removed.  The archive is written 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import io
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import SECRET_KEY_NAMES, Config
from gateway.contracts import DriverSpec
from gateway.runtime import driver_identities

UNIT = "edgetwin.service"
UNIT_PATHS = (
    Path("/etc/systemd/system") / UNIT,
    Path("/lib/systemd/system") / UNIT,
    Path("/usr/lib/systemd/system") / UNIT,
)
REMOVED = "<removed>"


class Redactor:
    """Replaces every known identity in a text by a pseudonym (see the module docstring)."""

    def __init__(self, identities: Iterable[str], key: bytes) -> None:
        self._key = key
        names = sorted({i for i in identities if i and len(i) >= 3}, key=len, reverse=True)
        self._map = {name.lower(): self._pseudonym(name) for name in names}
        self._pattern = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE) if names else None

    def _pseudonym(self, identity: str) -> str:
        digest = hmac.new(self._key, identity.encode(), hashlib.sha256).hexdigest()[:12]
        return f"id-{digest}"

    def __call__(self, text: str) -> str:
        """``text`` with every identity replaced."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self._map[m.group(0).lower()], text)


def identities(config: Config) -> list[str]:
    """Every identity a config names, and this machine's host name."""
    core = config.core
    found = [core.gateway.name, socket.gethostname()]
    for entry in config.sources:
        found += [entry.info.name, entry.info.subject, *driver_identities(entry.config)]
    if core.uplink.mqtt is not None and core.uplink.mqtt.username:
        found.append(core.uplink.mqtt.username)
    return found


def redacted_config(text: str) -> str:
    """The config's TOML text with the value of every secret-looking key removed (files are not read)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+)(\s*=\s*)(.*)$", line)
        secret = m is not None and m.group(2).split(".")[-1].lower() in SECRET_KEY_NAMES
        out.append(f'{m.group(1)}{m.group(2)}{m.group(3)}"{REMOVED}"' if m is not None and secret else line)
    return "\n".join(out) + "\n"


def _run(argv: list[str], timeout: float = 30.0) -> str:
    exe = shutil.which(argv[0])
    if exe is None:
        return f"({argv[0]} is not installed here)\n"
    try:
        done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603 - fixed argv
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(argv)} failed: {exc})\n"
    return (
        done.stdout
        + (f"\n(stderr)\n{done.stderr}" if done.stderr.strip() else "")
        + f"\n(exit {done.returncode})\n"
    )


def versions() -> str:
    """edgetwin, Python, OS, kernel and every installed distribution."""
    os_release = ""
    with contextlib.suppress(OSError):
        os_release = Path("/etc/os-release").read_text(encoding="utf-8")
    pretty = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in os_release.splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        "unknown",
    )
    dists = sorted(
        {
            f"{d.metadata['Name']}=={d.version}"
            for d in importlib.metadata.distributions()
            if d.metadata["Name"]
        },
        key=str.lower,
    )
    uname = platform.uname()
    return (
        f"edgetwin {__version__}\npython {sys.version.split()[0]} ({sys.executable})\n"
        f"os {pretty}\nkernel {uname.system} {uname.release} {uname.machine}\n\ninstalled distributions:\n"
        + "\n".join(f"  {d}" for d in dists)
        + "\n"
    )


def _unit_text() -> tuple[str, Path | None]:
    for path in UNIT_PATHS:
        if path.is_file():
            return path.read_text(encoding="utf-8"), path
    bundled = Path(__file__).resolve().parents[2] / "systemd" / UNIT
    if bundled.is_file():
        return f"# not installed; the unit shipped with edgetwin ({bundled}):\n" + bundled.read_text(
            encoding="utf-8"
        ), bundled
    return "(no edgetwin.service found)\n", None


def _outbox_stats(config: Config, snapshot: Mapping[str, Any] | None) -> dict[str, Any]:
    if snapshot is not None:
        return {"from": "the running gateway", **snapshot["outbox"]}
    from gateway.observe.lock import holder  # noqa: PLC0415
    from gateway.outbox import Outbox  # noqa: PLC0415

    path = config.core.outbox_path
    if not path.exists():
        return {"from": str(path), "note": "no outbox file yet"}
    if holder(config.core.gateway.state_dir) is not None:
        return {"from": str(path), "note": "a gateway holds it but does not answer on its control socket"}
    with Outbox(path) as ob:
        stats = ob.stats()
    return {
        "from": str(path),
        "queued": stats.queued,
        "bytes": stats.total_bytes,
        "lanes": {
            lane.name.lower(): {
                "queued": s.queued,
                "bytes": s.queued_bytes,
                "oldest_age_s": s.oldest_age_s,
                "dropped": dict(s.dropped),
            }
            for lane, s in stats.lanes.items()
        },
    }


def write_bundle(
    config_path: Path,
    registry: Mapping[str, DriverSpec],
    output: Path,
    *,
    journal_lines: int = 2000,
    online: bool = True,
) -> Path:
    """Write the archive to ``output`` (mode 0600) and return its path."""
    from gateway.config import load  # noqa: PLC0415
    from gateway.observe.check import run_check  # noqa: PLC0415
    from gateway.observe.config import socket_path  # noqa: PLC0415
    from gateway.observe.control import StatusUnavailableError, query  # noqa: PLC0415
    from gateway.observe.status import render_text  # noqa: PLC0415

    files: dict[str, str] = {}
    raw = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    config: Config | None = None
    with contextlib.suppress(Exception):
        config = load(config_path, registry)
    names: list[str] = identities(config) if config is not None else [socket.gethostname()]
    if config is None:
        # An invalid config still names its identities: take the values of the keys that hold them.
        with contextlib.suppress(tomllib.TOMLDecodeError):
            data = tomllib.loads(raw)
            names += driver_identities(data)
            names += [str(data.get("gateway", {}).get("name", ""))]
            for src in data.get("sources", []):
                names += [str(src.get("name", "")), str(src.get("subject", ""))]
    # A per-bundle key: pseudonyms link within one bundle, never across bundles or to the twin.
    redact = Redactor(names, secrets.token_bytes(32))

    files["versions.txt"] = versions()
    files["config.toml"] = redacted_config(raw) if raw else f"(no config at {config_path})\n"
    report = run_check(config_path, registry, with_online=online)
    files["check.txt"] = report.render(verbose=True) + f"\n(exit {report.exit_code()})\n"
    snapshot: dict[str, Any] | None = None
    if config is not None:
        try:
            snapshot = query(socket_path(config.core.status, config.core.gateway.state_dir, client=True))
        except StatusUnavailableError as exc:
            files["status.txt"] = f"{exc}\n"
        else:
            files["status.txt"] = render_text(snapshot) + "\n"
            files["status.json"] = json.dumps(snapshot, indent=2) + "\n"
        files["outbox.json"] = json.dumps(_outbox_stats(config, snapshot), indent=2) + "\n"
    files["journal.txt"] = _run(
        ["journalctl", "-u", UNIT, "-n", str(journal_lines), "--no-pager", "-o", "short-iso"]
    )
    unit, unit_path = _unit_text()
    files["unit.txt"] = unit
    files["hardening.txt"] = (
        _run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_path)])
        if unit_path is not None
        else "(no unit file)\n"
    )
    files["README.txt"] = (
        f"edgetwin support bundle, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"
        "Identities (gateway, sources, subjects, devices, host) are replaced by id-... pseudonyms made\n"
        "with a key used for this bundle only; secret values and secret files are not included;\n"
        "the outbox is described by its statistics, never by its records.\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw_out, tarfile.open(fileobj=raw_out, mode="w:gz") as tar:
        stamp = time.time()
        for name, text in files.items():
            body = redact(text).encode()
            info = tarfile.TarInfo(f"edgetwin-support/{name}")
            info.size, info.mtime, info.mode = len(body), int(stamp), 0o600
            tar.addfile(info, io.BytesIO(body))
    return output
