"""Config revisions from the twin under the shipped unit's file-system hardening, not beside it.

systemd is not PID 1 here, so the unit cannot be started; what ``ProtectSystem=strict`` and
``ReadWritePaths=`` do to the file system is rebuilt from the unit file instead: a scratch root
laid out by the shipped sysusers.d and tmpfiles.d files (the real tools, ``--root``), made
read-only in a private mount namespace with the unit's writable paths (``StateDirectory=``,
``RuntimeDirectory=``, ``ReadWritePaths=``) bound writable again, as systemd.exec(5) describes.
The gateway runs there as the ``edgetwin`` user with no capabilities (``CapabilityBoundingSet=``)
and takes a signed revision over the real TLS mosquitto.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from downlink_support import DEADLINE_S, ROOT, Site, applied, broker_running, new_site, running, source
from peers import ONE_AT_A_TIME
from test_systemd_unit import SYSUSERS, TMPFILES, UNIT, _service_settings
from uplink_support import mosquitto_pki

from gateway.uplink.certs import DemoPKI

pytestmark = [pytest.mark.slow, ONE_AT_A_TIME]


def writable_paths(unit_text: str) -> list[str]:
    """The paths a ``ProtectSystem=strict`` unit may write (systemd.exec(5)), absolute."""
    settings = _service_settings(unit_text)
    assert ("ProtectSystem", "strict") in settings
    out: list[str] = []
    for key, value in settings:
        if key == "StateDirectory":
            out += [f"/var/lib/{v}" for v in value.split()]
        elif key == "RuntimeDirectory":
            out += [f"/run/{v}" for v in value.split()]
        elif key == "ReadWritePaths":
            out += [v.lstrip("-") for v in value.split()]
    return out


def config_path(unit_text: str) -> str:
    """The config file ExecStart= names."""
    argv = shlex.split(dict(_service_settings(unit_text))["ExecStart"])
    return argv[argv.index("--config") + 1]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (bash .ci/setup test installs systemd and util-linux)")
    return path


class Layout:
    """A scratch root laid out by the shipped files, and how to run a command in the unit's view of it."""

    def __init__(self, root: Path, unit_text: str) -> None:
        self.root = root
        self.unit_text = unit_text
        (root / "etc").mkdir()
        for tool, conf in (("systemd-sysusers", SYSUSERS), ("systemd-tmpfiles", TMPFILES)):
            args = [_need(tool), f"--root={root}", *(["--create"] if "tmpfiles" in tool else []), str(conf)]
            done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        user = next(
            line.split(":")
            for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("edgetwin:")
        )
        self.uid, self.gid = int(user[2]), int(user[3])
        for rel in ("var/lib/edgetwin", "run/edgetwin"):  # what systemd makes for State/RuntimeDirectory=
            (root / rel).mkdir(parents=True, exist_ok=True)
            os.chown(root / rel, self.uid, self.gid)
        self.config = self.at(config_path(unit_text))

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def install(self, src: bytes, dest: str, mode: int, *, owner: str) -> Path:
        """``install -m MODE -o OWNER -g edgetwin`` into the scratch root."""
        path = self.at(dest)
        path.write_bytes(src)
        path.chmod(mode)
        os.chown(path, self.uid if owner == "edgetwin" else 0, self.gid)
        return path

    def _reach_interpreter(self) -> list[str]:
        """Commands that let the service user reach this interpreter, inside the namespace only.

        An interpreter installed under a directory only root may enter (a Python under /root) is
        run by the service user only through a capability it does not have; on a real host the
        venv is in /opt.  The directory is covered, in this namespace, by an empty tmpfs that
        others may enter, with the interpreter's tree bound back into it.
        """
        real = Path(os.path.realpath(sys.executable))
        for parent in reversed(real.parents):
            if parent != parent.parent and not parent.stat().st_mode & 0o001:
                inner = parent / real.relative_to(parent).parts[0]
                hold = self.root / ".interpreter"
                hold.mkdir(exist_ok=True)
                q = shlex.quote
                return [
                    f"mount --bind {q(str(inner))} {q(str(hold))}",
                    f"mount -t tmpfs -o mode=0755,size=1m edgetwin-test {q(str(parent))}",
                    f"mkdir {q(str(inner))}",
                    f"mount --bind {q(str(hold))} {q(str(inner))}",
                ]
        return []

    def argv(self, *command: str, unit_text: str | None = None) -> list[str]:
        """``command`` as the unit would run it: root read-only, its writable paths writable, as edgetwin."""
        q = shlex.quote
        rw = [self.at(p) for p in writable_paths(unit_text or self.unit_text)]
        script = [*self._reach_interpreter()]
        script.append(f"mount --bind {q(str(self.root))} {q(str(self.root))}")
        script.append(f"mount -o remount,bind,ro {q(str(self.root))}")
        for p in (q(str(p)) for p in rw if p.exists()):
            script += [f"mount --bind {p} {p}", f"mount -o remount,bind,rw {p}"]
        drop = [_need("setpriv"), f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        drop += ["--inh-caps=-all", "--bounding-set=-all", "--"]
        script.append("exec " + shlex.join([*drop, *command]))
        return [_need("unshare"), "--mount", "--propagation", "private", "sh", "-ec", "\n".join(script)]


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("laying out /etc and /var/lib with their owners and a mount namespace need root")
    # Not under pytest's tmp_path: its parent is 0700 root, which the edgetwin user cannot pass.
    root = Path(tempfile.mkdtemp(prefix=f"edgetwin-unit-{os.getpid()}-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return mosquitto_pki(tmp_path_factory)


def _write_as_service_settings(layout: Layout, target: Path, unit_text: str | None = None) -> str:
    """Replace ``target`` the way the downlink does (temp file beside it, rename), as the service."""
    code = (
        "import sys; from pathlib import Path; from gateway.downlink.state import write_atomic\n"
        "p = Path(sys.argv[1])\n"
        "try:\n    write_atomic(p, b'x = 1\\n', *([p.stat().st_mode & 0o777] if p.exists() else []))\n"
        "except OSError as exc:\n    print(exc.strerror)\nelse:\n    print('written')\n"
    )
    done = subprocess.run(
        layout.argv(sys.executable, "-c", code, str(target), unit_text=unit_text),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_shipped_unit_lets_the_service_replace_its_own_config_files_and_nothing_else(
    scratch_root: Path,
) -> None:
    layout = Layout(scratch_root, UNIT.read_text())
    config = layout.install(b"[gateway]\n", config_path(layout.unit_text), 0o640, owner="edgetwin")
    trust = layout.install(b"{}\n", "/etc/edgetwin/downlink-trust.json", 0o640, owner="root")
    key = layout.install(b"k\n", "/etc/edgetwin/secrets/gateway.key", 0o600, owner="edgetwin")
    assert _write_as_service_settings(layout, config) == "written"
    assert _write_as_service_settings(layout, key) == "written"  # certificate renewal replaces its TLS pair
    assert (config.stat().st_uid, config.stat().st_mode & 0o777) == (layout.uid, 0o640)
    # Sticky directory: a file root installed is not the service's to replace.
    assert _write_as_service_settings(layout, trust) == "Operation not permitted"
    assert trust.read_bytes() == b"{}\n"
    # The rest of the system stays read-only (ProtectSystem=strict), even where the owner could write.
    os.chown(layout.root / "etc", layout.uid, layout.gid)
    assert _write_as_service_settings(layout, layout.root / "etc" / "hosts") == "Read-only file system"
    # Without ReadWritePaths= the same write fails: what the line above adds is what makes it work.
    without = "\n".join(
        line for line in layout.unit_text.splitlines() if not line.startswith("ReadWritePaths=")
    )
    assert _write_as_service_settings(layout, config, without) == "Read-only file system"


class ShippedSite(Site):
    """A site whose gateway runs under the unit's file-system view, with the files where the README puts them."""

    layout: Layout

    def text(self, sources: str, *, port: int | None = None, deadline_s: float = DEADLINE_S) -> str:
        lay = self.layout
        text = super().text(sources, port=port, deadline_s=deadline_s)
        for old, new in (
            (self.tmp / "state", lay.at("/var/lib/edgetwin")),
            (self.tmp / "trust.json", lay.at("/etc/edgetwin/downlink-trust.json")),
            (self.pki.gateway.cert, lay.at("/etc/edgetwin/secrets/gateway.crt")),
            (self.pki.gateway.key, lay.at("/etc/edgetwin/secrets/gateway.key")),
            (self.pki.ca_file, lay.at("/etc/edgetwin/ca.pem")),
        ):
            text = text.replace(f'"{old}"', f'"{new}"')
        return text

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_DIRECTORY=str(self.layout.at("/run/edgetwin")))
        env.pop("NOTIFY_SOCKET", None)
        argv = self.layout.argv(sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config))
        with (self.tmp / "gateway.log").open("a") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True
            )

    def events(self) -> list[dict[str, object]]:
        import json  # noqa: PLC0415

        path = self.layout.at("/var/lib/edgetwin/downlink/audit.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_revision_is_applied_by_a_gateway_running_under_the_shipped_unit(
    tmp_path: Path, scratch_root: Path, pki: DemoPKI
) -> None:
    layout = Layout(scratch_root, UNIT.read_text())
    with broker_running(tmp_path, pki) as broker:
        plain = new_site(tmp_path, pki, broker)
        site = ShippedSite(tmp_path, pki, broker, layout.config, plain.key, "")
        site.layout = layout
        # The README's install steps: trust and CA root's, the config and the TLS pair the gateway's.
        layout.install(
            (tmp_path / "trust.json").read_bytes(), "/etc/edgetwin/downlink-trust.json", 0o640, owner="root"
        )
        layout.install(pki.ca_file.read_bytes(), "/etc/edgetwin/ca.pem", 0o644, owner="root")
        layout.install(
            pki.gateway.cert.read_bytes(), "/etc/edgetwin/secrets/gateway.crt", 0o644, owner="edgetwin"
        )
        layout.install(
            pki.gateway.key.read_bytes(), "/etc/edgetwin/secrets/gateway.key", 0o600, owner="edgetwin"
        )
        first = site.text(source("bed7-sim"))
        layout.install(first.encode(), config_path(layout.unit_text), 0o640, owner="edgetwin")
        site.gateway = _pseudonym_as_service_settings(layout, site.config)
        try:
            site.start()
            site.reported(running(site.unit("bed7-sim")), "running under the unit")
            revision = source("bed7-sim") + source("bed9-sim", device="A4:C1:38:00:00:09")
            site.publish(site.envelope(1, revision))
            rep = site.reported(applied(1), "v1 applied under the unit", timeout=60)
            assert rep["units"][site.unit("bed9-sim")] == "running"
            assert site.config.read_text() == site.text(revision)
            st = site.config.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (layout.uid, 0o640)  # still the gateway's, still 0640
            previous = layout.at("/var/lib/edgetwin/downlink/previous.toml")
            assert previous.read_text() == first
            assert [e["event"] for e in site.events()][-2:] == ["applying", "applied"]
        finally:
            site.stop()


def _pseudonym_as_service_settings(layout: Layout, config: Path) -> str:
    """The gateway's pseudonym, computed as the service (so the site key it creates is the service's)."""
    code = "import sys; from pathlib import Path; from gateway.uplink.commands import _gateway_pseudonym\n"
    code += "print(_gateway_pseudonym(Path(sys.argv[1])))"
    done = subprocess.run(
        layout.argv(sys.executable, "-c", code, str(config)),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
