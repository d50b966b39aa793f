"""``edgetwin check``: every problem of a config and its environment in one pass, each with its fix.

Offline (always): the file and its schema, the uplink's certificates (present, parseable, valid
now, matching their key, chaining to the configured CA), secrets' modes (through the schema),
drivers and models that refuse to build, metric names that hold an identity the config names
(:mod:`gateway.held_names`), and whatever :data:`OFFLINE_CHECKS` adds.  The
certificate checks read the raw TOML, so they run even when the schema has errors elsewhere:
a technician sees all of them at once.

Online (``--online``): DNS, TCP to the broker, the TLS handshake with the configured files, the
MQTT CONNACK, clock sanity, OPC UA endpoints, serial ports, the BLE adapter, disk space for the
outbox budget and a writable state directory.

Every finding is ``pass``, ``warn`` or ``fail``; any ``fail`` exits non-zero (78 when the
configuration itself is wrong, 1 when only the environment is).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import os
import shutil
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config import Config, validate
from gateway.contracts import DriverSpec
from gateway.errors import ConfigError, ConfigProblem, EdgetwinError, InvalidConfigError
from gateway.outbox.space import DEFAULT_RESERVE_BYTES, DiskReserve
from gateway.timebase import clock_synchronised

EXIT_OK = 0
EXIT_ENVIRONMENT = 1
EXIT_CONFIG = 78

CERT_WARN_DAYS = 30
_ALERT_WAIT_S = 0.5


class Level(enum.StrEnum):
    PASS = "pass"  # noqa: S105 - a check outcome, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One result: how it went, what was checked, what was found and what to do."""

    level: Level
    check: str
    message: str
    fix: str = ""
    config: bool = True  # a problem of the file (exit 78) rather than of the environment (exit 1)

    def render(self) -> str:
        """One line, plus the fix on its own line when there is one."""
        line = f"{self.level.value:<4}  {self.check}: {self.message}"
        return line + (f"\n      fix: {self.fix}" if self.fix else "")


#: Further offline checks on a valid config (e.g. model input coverage); each returns its findings.
OFFLINE_CHECKS: list[Callable[[Config], list[Finding]]] = []


@dataclass(slots=True)
class Report:
    """Findings of one run of ``check``."""

    path: Path
    findings: list[Finding]
    config: Config | None = None

    @property
    def failures(self) -> list[Finding]:
        """The findings that fail."""
        return [f for f in self.findings if f.level is Level.FAIL]

    @property
    def warnings(self) -> list[Finding]:
        """The findings that warn."""
        return [f for f in self.findings if f.level is Level.WARN]

    def exit_code(self) -> int:
        """0 without failures; 78 when the file is wrong; 1 when only the environment is."""
        failures = self.failures
        if not failures:
            return EXIT_OK
        return EXIT_CONFIG if any(f.config for f in failures) else EXIT_ENVIRONMENT

    def render(self, *, verbose: bool = True) -> str:
        """The report as text: failures, then warnings, then (verbose) passes, then a summary."""
        order = {Level.FAIL: 0, Level.WARN: 1, Level.PASS: 2}
        shown = sorted(
            (f for f in self.findings if verbose or f.level is not Level.PASS), key=lambda f: order[f.level]
        )
        lines = [f.render() for f in shown]
        fails, warns = len(self.failures), len(self.warnings)
        if fails:
            lines.append(
                f"config {self.path}: {fails} failure(s), {warns} warning(s): "
                f"fix them and run 'edgetwin check --config {self.path}' again"
            )
        else:
            sources = self.config.sources if self.config else ()
            names = ", ".join(
                f"{e.info.name} ({e.driver}, {e.info.kind}{'' if e.enabled else ', disabled'})"
                for e in sources
            )
            lines.append(
                f"config {self.path}: ok ({len(sources)} source(s): {names or 'none'})"
                + (f", {warns} warning(s)" if warns else "")
            )
        return "\n".join(lines)


# --- offline ----------------------------------------------------------------------------------------


def _problem(p: ConfigProblem) -> Finding:
    return Finding(Level.FAIL, "config", f"{p.path}: expected {p.expected}, found {p.found}")


def _raw_table(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    node: Any = data
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _raw_path(table: Mapping[str, Any], key: str) -> Path | None:
    value = table.get(key)
    return Path(value) if isinstance(value, str) and value else None


def certificate_findings(mqtt: Mapping[str, Any], now: dt.datetime | None = None) -> list[Finding]:
    """The uplink's CA bundle, client certificate and key: present, valid now, matching, chaining."""
    try:
        from gateway.uplink import certs  # noqa: PLC0415 - the optional mqtt extra (cryptography)
    except ImportError:
        return []
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    now = now or dt.datetime.now(dt.UTC)
    out: list[Finding] = []
    ca_path, cert_path, key_path = (_raw_path(mqtt, k) for k in ("ca_file", "cert_file", "key_file"))
    cas: list[x509.Certificate] = []
    if ca_path is not None:
        try:
            cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
        except FileNotFoundError:
            out.append(
                Finding(
                    Level.FAIL,
                    "certificates",
                    f"uplink.mqtt.ca_file: no file at {ca_path}",
                    "copy the CA that issued the broker's certificate there (PEM), or correct the path",
                )
            )
        except (OSError, ValueError):
            out.append(
                Finding(
                    Level.FAIL,
                    "certificates",
                    f"uplink.mqtt.ca_file: {ca_path} holds no PEM certificate",
                    "give the CA bundle in PEM",
                )
            )
        else:
            out += _validity("uplink.mqtt.ca_file", "CA certificate", ca_path, cas[0], now, certs)
    cert: x509.Certificate | None = None
    if cert_path is not None:
        try:
            cert = certs.load_cert(cert_path)
        except ConfigError:
            missing = not cert_path.exists()
            out.append(
                Finding(
                    Level.FAIL,
                    "certificates",
                    "uplink.mqtt.cert_file: "
                    + (f"no file at {cert_path}" if missing else f"{cert_path} is not a PEM certificate"),
                    "put the gateway's certificate there (edgetwin provision import), or correct the path"
                    if missing
                    else "give the certificate in PEM",
                )
            )
        else:
            out += _validity("uplink.mqtt.cert_file", "client certificate", cert_path, cert, now, certs)
    key: Any = None
    # A missing key or one with a loose mode is reported by the schema; here only its content.
    if key_path is not None and key_path.is_file():
        try:
            key = certs.load_key(key_path)
        except ConfigError:
            out.append(
                Finding(
                    Level.FAIL,
                    "certificates",
                    f"uplink.mqtt.key_file: {key_path} is not an unencrypted PEM private key",
                    "give the key in PEM (PKCS#8 or traditional) without a passphrase",
                )
            )
    if cert is not None and key is not None:
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
            out.append(
                Finding(
                    Level.FAIL,
                    "certificates",
                    f"uplink.mqtt.key_file: {key_path} is not the key of the certificate {cert_path}",
                    "configure the key the certificate was issued for (edgetwin provision import checks pairs)",
                )
            )
        else:
            out.append(
                Finding(
                    Level.PASS, "certificates", f"client certificate {cert_path} matches its key {key_path}"
                )
            )
    if cert is not None and cas:
        if any(_issued_by(cert, ca) for ca in cas):
            out.append(
                Finding(Level.PASS, "certificates", f"client certificate {cert_path} is issued by {ca_path}")
            )
        elif not any(cert == ca for ca in cas):
            issuer = cert.issuer.rfc4514_string()
            out.append(
                Finding(
                    Level.WARN,
                    "certificates",
                    f"client certificate {cert_path} (issued by {issuer}) does not chain to {ca_path}",
                    "fine when the broker trusts another CA for clients; otherwise have the certificate "
                    "issued by the fleet CA",
                )
            )
    return out


def _issued_by(cert: Any, ca: Any) -> bool:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - the optional mqtt extra

    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _validity(key: str, label: str, path: Path, cert: Any, now: dt.datetime, certs: Any) -> list[Finding]:
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_before_utc > now:
        return [
            Finding(
                Level.FAIL,
                "certificates",
                f"{key}: {label} {path} ({subject}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check the clock (timedatectl) or wait until the certificate is valid",
            )
        ]
    info = certs.CertInfo(path, subject, cert.not_valid_before_utc, cert.not_valid_after_utc)
    found = certs.expiry_message(info, now, CERT_WARN_DAYS)
    if found is None:
        return [
            Finding(
                Level.PASS,
                "certificates",
                f"{label} {path} ({subject}) valid until {info.not_after:%Y-%m-%d}",
            )
        ]
    expired, _ = found
    if expired:
        return [
            Finding(
                Level.FAIL,
                "certificates",
                f"{key}: {label} {path} ({subject}) expired on {info.not_after:%Y-%m-%d}",
                "renew it (edgetwin provision key, have the CSR signed, edgetwin provision import)",
            )
        ]
    return [
        Finding(
            Level.WARN,
            "certificates",
            f"{key}: {label} {path} ({subject}) expires on {info.not_after:%Y-%m-%d}, "
            f"in {info.days_left(now):.0f} day(s)",
            "renew it before then",
        )
    ]


def offline(
    path: Path, registry: Mapping[str, DriverSpec], now: dt.datetime | None = None
) -> tuple[Report, Mapping[str, Any]]:
    """Every offline finding for the config at ``path`` (and the raw TOML, for the online part)."""
    report = Report(path, [])
    file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.findings.append(Finding(Level.FAIL, "config", f"no file at {path}", "give the config's path"))
        return report, {}
    except (OSError, UnicodeDecodeError) as exc:
        report.findings.append(
            Finding(Level.FAIL, "config", f"cannot read {path}: {exc}", "make it a readable UTF-8 file")
        )
        return report, {}
    except tomllib.TOMLDecodeError as exc:
        report.findings.append(Finding(Level.FAIL, "config", f"not valid TOML: {exc}", "fix the syntax"))
        return report, {}
    try:
        report.config = validate(data, file, registry)
    except InvalidConfigError as exc:
        report.findings += [_problem(p) for p in exc.problems]
    else:
        report.findings.append(Finding(Level.PASS, "config", "every key is known and valid"))
    report.findings += certificate_findings(_raw_table(data, "uplink", "mqtt"), now)
    config = report.config
    if config is not None:
        # Imported here: runtime builds the parts; check only asks them whether they would build.
        from gateway.runtime import build_problems  # noqa: PLC0415

        problems = build_problems(config, registry)
        report.findings += [
            Finding(Level.FAIL, "build", text, "change the setting named; see the driver's README")
            for text in problems
        ]
        if not problems:
            report.findings.append(Finding(Level.PASS, "build", "every source and model builds"))
        report.findings += held_name_findings(config)
        if not any(p.startswith("models:") for p in problems):
            # Coverage needs models that load; a model that does not is reported above.
            report.findings += coverage_findings(config)
        for extra in OFFLINE_CHECKS:
            report.findings += extra(config)
    return report, data


def held_name_findings(config: Config) -> list[Finding]:
    """A metric whose name holds an identity the config names fails: every record carrying it is dropped."""
    from gateway.runtime import config_held_names  # noqa: PLC0415 - with build_problems, above

    held = config_held_names(config)
    out = [Finding(Level.FAIL, "privacy", f"{config.file}: {h.reason()}", h.fix()) for h in held]
    if not held:
        out.append(
            Finding(Level.PASS, "privacy", "no declared metric name holds an identity the config names")
        )
    return out


def coverage_findings(config: Config) -> list[Finding]:
    """Which models score which subject and what watches it; a model that scores nothing fails."""
    from gateway.inference.coverage import check_coverage  # noqa: PLC0415

    lines, problems = check_coverage(config)
    out = [
        Finding(Level.WARN if "will not" in line else Level.PASS, "models", line, config=True)
        for line in lines
    ]
    out += [Finding(Level.FAIL, "models", text) for text in problems]
    return out


# --- online -----------------------------------------------------------------------------------------


def _env(level: Level, check: str, message: str, fix: str = "") -> Finding:
    return Finding(level, check, message, fix, config=False)


def _state_dir(config: Config) -> list[Finding]:
    state = config.core.gateway.state_dir
    probe_dir = state if state.exists() else _nearest_existing(state)
    try:
        fd, name = _temp_in(probe_dir)
        os.close(fd)
        Path(name).unlink()
    except OSError as exc:
        return [
            _env(
                Level.FAIL,
                "state directory",
                f"{probe_dir} is not writable: {exc.strerror}",
                f"create {state} owned by the gateway's user (systemd's StateDirectory= does it)",
            )
        ]
    what = (
        "writable"
        if probe_dir == state
        else f"does not exist yet; {probe_dir} is writable, it will be created"
    )
    return [_env(Level.PASS, "state directory", f"{state} {what}")]


def _temp_in(directory: Path) -> tuple[int, str]:
    name = str(directory / f".edgetwin-check-{os.getpid()}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def _disk(config: Config) -> list[Finding]:
    where = _nearest_existing(config.core.outbox_path.parent)
    budget = config.core.outbox.max_mb * 1024 * 1024
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return [_env(Level.FAIL, "disk", f"cannot read free space of {where}: {exc.strerror}")]
    # The database and the full-disk reserve beside it (gateway.outbox.space) are space it holds.
    reserve = DiskReserve(config.core.outbox_path, DEFAULT_RESERVE_BYTES)
    held = sum(p.stat().st_size for p in (config.core.outbox_path, reserve.path) if p.exists())
    free = usage.free + held
    mb = 1024 * 1024
    if free < budget + reserve.size:
        # Without room for its reserve the outbox starts degraded and, on a filesystem that never
        # has twice the reserve free, refuses every feature window for good.
        return [
            _env(
                Level.FAIL,
                "disk",
                f"the outbox budget of {budget / mb:.0f} MB and its {reserve.size / mb:.0f} MB full-disk reserve "
                f"do not fit: {free / mb:.0f} MB free on {where}",
                "free space, or lower outbox.max_mb",
            )
        ]
    if free < 2 * budget:
        return [
            _env(
                Level.WARN,
                "disk",
                f"the outbox budget of {budget / mb:.0f} MB leaves little room: {free / mb:.0f} MB free on {where}",
                "free space, or lower outbox.max_mb, so logs and updates still fit",
            )
        ]
    return [
        _env(Level.PASS, "disk", f"{free / mb:.0f} MB free on {where} for an outbox of {budget / mb:.0f} MB")
    ]


def _clock(config: Config, now: dt.datetime) -> list[Finding]:
    out: list[Finding] = []
    mq = config.core.uplink.mqtt
    earliest: list[tuple[dt.datetime, Path]] = []
    if mq is not None:
        with contextlib.suppress(ImportError, EdgetwinError, OSError, ValueError):
            from gateway.uplink import certs  # noqa: PLC0415

            earliest += [(certs.cert_info(p).not_before, p) for p in (mq.ca_file, mq.cert_file) if p]
    late = [(t, p) for t, p in earliest if t > now]
    if late:
        t, p = late[0]
        out.append(
            _env(
                Level.FAIL,
                "clock",
                f"the wall clock ({now:%Y-%m-%d %H:%M} UTC) is before {p} became valid ({t:%Y-%m-%d %H:%M} UTC)",
                "set the clock (timedatectl set-ntp true): TLS refuses certificates from the future",
            )
        )
    synced = clock_synchronised()
    if synced is False:
        out.append(
            _env(
                Level.WARN,
                "clock",
                "the kernel reports the clock as not synchronised",
                "enable time synchronisation (timedatectl set-ntp true, or chrony); record times and TLS depend on it",
            )
        )
    elif not late:
        out.append(
            _env(Level.PASS, "clock", f"{now:%Y-%m-%d %H:%M} UTC" + (", synchronised" if synced else ""))
        )
    return out


def _mqtt_connect_packet(
    client_id: str, protocol: str, keepalive: int, username: str | None, password: str | None
) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    level = 5 if protocol == "5" else 4
    flags = 0x02  # clean start: the check's session leaves nothing behind on the broker
    payload = s(client_id)
    if username is not None:
        flags |= 0x80
        payload += s(username)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    variable = s("MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big")
    if level == 5:
        variable += b"\x00"  # no properties
    body = variable + payload
    length = len(body)
    encoded = b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + encoded + body


_CONNACK_TEXT = {
    0x01: "unacceptable protocol version",
    0x02: "client identifier rejected",
    0x03: "server unavailable",
    0x04: "bad user name or password",
    0x05: "not authorised",
    0x80: "unspecified error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorised",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the broker closed the connection")
        data += chunk
    return data


def _mqtt(config: Config, client_id: str) -> list[Finding]:
    mq = config.core.uplink.mqtt
    if mq is None:
        return []
    where = f"{mq.host}:{mq.port}"
    out: list[Finding] = []
    try:
        infos = socket.getaddrinfo(mq.host, mq.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [
            _env(
                Level.FAIL,
                "dns",
                f"cannot resolve {mq.host}: {exc.strerror}",
                "check uplink.mqtt.host and the DNS servers (resolvectl status)",
            )
        ]
    addresses = sorted({str(i[4][0]) for i in infos})
    out.append(_env(Level.PASS, "dns", f"{mq.host} resolves to {', '.join(addresses)}"))
    try:
        raw = socket.create_connection((mq.host, mq.port), timeout=mq.connect_timeout_s)
    except OSError as exc:
        why = (
            "connection refused (nothing listens there)"
            if isinstance(exc, ConnectionRefusedError)
            else (
                f"no answer within {mq.connect_timeout_s:g} s"
                if isinstance(exc, TimeoutError)
                else str(exc.strerror or exc)
            )
        )
        return [
            *out,
            _env(
                Level.FAIL,
                "tcp",
                f"cannot connect to {where}: {why}",
                "check that the broker runs and uplink.mqtt.port, and that no firewall blocks the port",
            ),
        ]
    out.append(_env(Level.PASS, "tcp", f"connected to {where}"))
    sock: socket.socket = raw
    try:
        if mq.tls:
            from gateway.uplink import tls  # noqa: PLC0415 - the optional mqtt extra

            try:
                ctx = tls.client_context(mq)
                sock = ctx.wrap_socket(raw, server_hostname=mq.verify_name)
            except (ConfigError, ssl.SSLError, OSError) as exc:
                err = tls.classify(exc, mq) if not isinstance(exc, ConfigError) else exc
                what, _, fix = _strip_where(str(err), mq).rpartition(": ")
                return [*out, _env(Level.FAIL, "tls", what or fix, fix if what else "")]
            out.append(
                _env(
                    Level.PASS,
                    "tls",
                    f"{sock.version()} handshake with {mq.verify_name}, certificate verified",
                )
            )
        password = mq.password_file.read_text(encoding="utf-8").strip() if mq.password_file else None
        try:
            if mq.tls:
                # TLS 1.3 sends a refused client certificate's alert after the handshake: give it a
                # moment to arrive, so it is reported as what it is rather than as a closed socket.
                sock.settimeout(_ALERT_WAIT_S)
                with contextlib.suppress(TimeoutError):
                    sock.recv(1)
            sock.settimeout(mq.connect_timeout_s)
            sock.sendall(_mqtt_connect_packet(client_id, mq.protocol, mq.keepalive_s, mq.username, password))
            head = _recv_exact(sock, 2)
            body = _recv_exact(sock, head[1])
        except (OSError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLError):
                from gateway.uplink import tls  # noqa: PLC0415

                known = tls.from_text(str(exc), mq)
                if known is not None:
                    what, _, fix = _strip_where(str(known), mq).rpartition(": ")
                    return [*out, _env(Level.FAIL, "mqtt", f"no CONNACK from {where}: {what}", fix)]
            return [
                *out,
                _env(
                    Level.FAIL,
                    "mqtt",
                    f"no CONNACK from {where}: the broker closed the connection ({exc})",
                    "the broker may refuse the client certificate or the client id; see its log",
                ),
            ]
        code = body[1] if len(body) > 1 else 0xFF
        if head[0] >> 4 != 2 or code != 0:
            text = _CONNACK_TEXT.get(code, f"reason 0x{code:02x}")
            out.append(
                _env(
                    Level.FAIL,
                    "mqtt",
                    f"{where} refused the connection: {text}",
                    "allow this gateway's certificate or user on the broker (its ACL and policies)",
                )
            )
        else:
            out.append(_env(Level.PASS, "mqtt", f"CONNACK from {where} (MQTT {mq.protocol}), accepted"))
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
    finally:
        sock.close()
    return out


def _strip_where(text: str, mq: Any) -> str:
    return text.removeprefix(f"uplink mqtt {mq.host}:{mq.port}: ")


#: A driver's own online probe: (source name, its config) -> [(level, message, fix)].
Probe = Callable[[str, Any], list[tuple[str, str, str]]]


def _sources(config: Config, probes: Mapping[str, Probe]) -> list[Finding]:
    out: list[Finding] = []
    for entry in config.sources:
        if not entry.enabled:
            continue
        cfg = entry.config
        name = f"source {entry.info.name}"
        port = getattr(cfg, "port", None)
        if isinstance(port, Path) and entry.driver not in probes:  # a driver's probe covers its port
            if not port.exists():
                out.append(
                    _env(
                        Level.FAIL,
                        "serial",
                        f"{name}: no serial port {port}",
                        "plug the adapter in, or correct the port (ls /dev/serial/by-id/)",
                    )
                )
            elif not os.access(port, os.R_OK | os.W_OK):
                out.append(
                    _env(
                        Level.FAIL,
                        "serial",
                        f"{name}: {port} is not readable and writable by this user",
                        "add the gateway's user to the port's group (dialout)",
                    )
                )
            else:
                out.append(_env(Level.PASS, "serial", f"{name}: {port} present"))
        endpoint = getattr(cfg, "endpoint", None)
        if entry.driver in probes:
            out += [
                _env(Level(level), entry.driver, message, fix)
                for level, message, fix in probes[entry.driver](entry.info.name, cfg)
            ]
        elif isinstance(endpoint, str) and endpoint.startswith("opc.tcp://"):
            out += _opcua(name, endpoint)
        adapter = getattr(cfg, "adapter", None)
        if isinstance(adapter, str) and adapter.startswith("hci") and entry.driver not in probes:
            if Path("/sys/class/bluetooth", adapter).exists():
                out.append(_env(Level.PASS, "ble", f"{name}: adapter {adapter} present"))
            else:
                out.append(
                    _env(
                        Level.FAIL,
                        "ble",
                        f"{name}: no Bluetooth adapter {adapter}",
                        "plug the adapter in and check 'bluetoothctl list', or correct adapter",
                    )
                )
    return out


def _opcua(name: str, endpoint: str) -> list[Finding]:
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or 4840
    try:
        with socket.create_connection((host, port), timeout=5.0):
            pass
    except OSError as exc:
        return [
            _env(
                Level.FAIL,
                "opcua",
                f"{name}: cannot connect to {host}:{port}: {exc.strerror or exc}",
                "check that the PLC's OPC UA server runs and the endpoint in the config",
            )
        ]
    return [_env(Level.PASS, "opcua", f"{name}: {host}:{port} accepts connections")]


def online(
    config: Config, client_id: str, now: dt.datetime | None = None, probes: Mapping[str, Probe] | None = None
) -> list[Finding]:
    """The online findings for a valid config."""
    now = now or dt.datetime.now(dt.UTC)
    return [
        *_state_dir(config),
        *_disk(config),
        *_clock(config, now),
        *_mqtt(config, client_id),
        *_sources(config, probes or {}),
    ]


def run_check(
    path: Path,
    registry: Mapping[str, DriverSpec],
    *,
    with_online: bool = False,
    client_id: str = "edgetwin-check",
    now: dt.datetime | None = None,
    probes: Mapping[str, Probe] | None = None,
) -> Report:
    """Every finding for ``path``: offline always, online when asked and the config is valid."""
    report, _ = offline(path, registry, now)
    if with_online and report.config is not None:
        report.findings += online(report.config, client_id, now, probes)
    return report
