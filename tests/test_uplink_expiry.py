"""The service's certificate expiry check reads certificates with the standard library only."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.uplink import certs, expiry


def test_the_stdlib_reader_agrees_with_cryptography(tmp_path: Path) -> None:
    ca = certs.DemoCA(tmp_path)
    now = dt.datetime.now(dt.UTC)
    issued = [
        ca.issue("fine", "fine"),
        ca.issue("soon", 'gw, "odd" +name', valid_until=now + dt.timedelta(days=10)),
        ca.issue(
            "gone", "gone", valid_from=now - dt.timedelta(days=60), valid_until=now - dt.timedelta(days=1)
        ),
    ]
    for cert in [ca.ca_file, *(i.cert for i in issued)]:
        ours, theirs = expiry.read_cert_info(cert), certs.cert_info(cert)
        assert ours == theirs
        assert expiry.expiry_message(ours) == certs.expiry_message(theirs)
    assert expiry.expiry_message(expiry.read_cert_info(issued[2].cert)) is not None


def test_a_missing_or_broken_certificate_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.crt: no such file"):
        expiry.read_cert_info(tmp_path / "missing.crt")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"junk\.crt: not a PEM certificate"):
        expiry.read_cert_info(junk)


def test_the_service_path_does_not_load_cryptography_or_the_plugins_commands() -> None:
    # cryptography is ~8 MB of RSS and the plugins' simulators ~20 MB: 'edgetwin run' needs neither.
    code = (
        "import sys; from gateway.cli import build_parser; import gateway.uplink.mqtt; "
        "p = build_parser(plugins=False); "
        "bad = [m for m in ('cryptography', 'asyncua', 'dbus_fast', 'drivers.opcua.plcsim') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
