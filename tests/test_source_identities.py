"""Every identity a configuration names is known to the anonymizer and the log redactor from the start.

A wearable bound to a bed of its own (``devices[].subject``), a monitor's configured name, an OPC UA
user and URIs: none may leave the gateway in a record or a log line, not even one sent before the
first sample that would otherwise make the anonymizer learn it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_logs import redactor  # noqa: F401  (the fixture: a clean redactor, switched on)

from drivers import REGISTRY
from gateway.anonymize import Anonymizer, Pseudonymizer, load_or_create_key
from gateway.config import Config, load
from gateway.contracts import Diagnostic
from gateway.errors import AnonymizationError
from gateway.legend import render
from gateway.logs import REDACTOR
from gateway.observe.bundle import identities
from gateway.records import encode
from gateway.runtime import register_source_identities

CONFIG = """
[gateway]
name = "ward3-hub"
state_dir = "{state}"

[[sources]]
name = "ward3-wearables"
driver = "ble"
subject = "ward3-bed12"
kind = "medical"
devices = [
  {{ address = "C2:00:00:00:00:01", profile = "hr" }},
  {{ address = "C2:00:00:00:00:02", profile = "plx", subject = "icu_bed14" }},
]

[[sources]]
name = "bed9-oximeter"
driver = "serial"
subject = "ward3-bed9"
kind = "medical"
port = "/dev/serial/by-id/usb-nonin-if00"
device = "MONITOR-4471"
enabled = false

[[sources]]
name = "pump-plc"
driver = "opcua"
subject = "line2-pump"
kind = "industrial"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "None"
security_mode = "None"
namespace_uri = "urn:acme-works:line2"
application_uri = "urn:ward3-hub-opc:client"
username = "line2-operator"
password_file = "{password}"
nodes = [{{ browse_path = "2:Pump1/2:Flow" }}]

[[sources]]
name = "motor-node"
driver = "mcu"
subject = "line2-motor"
kind = "industrial"
metrics = {{ device = "winding_temp" }}
simulate = {{ node_id = "NODE-7731" }}
"""

#: What the file above names, one identity of each kind.
NAMED = (
    "icu_bed14",  # a wearable's own bed
    "ward3-bed12",
    "C2:00:00:00:00:02",
    "ward3-bed9",  # of a disabled source too
    "MONITOR-4471",
    "line2-operator",
    "urn:acme-works:line2",
    "urn:ward3-hub-opc:client",
    "opc.tcp://127.0.0.1:4840",
    "NODE-7731",
)


def _config(tmp_path: Path) -> Config:
    password = tmp_path / "opc.pw"
    password.write_text("secret\n")
    password.chmod(0o600)
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", password=password))
    return load(path, REGISTRY)


def _started(tmp_path: Path) -> Anonymizer:
    """The anonymizer as the gateway's start leaves it, before any source runs."""
    config = _config(tmp_path)
    anonymizer = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative")
    anonymizer.on_identity = REDACTOR.add
    for entry in config.sources:
        register_source_identities(anonymizer, entry)
    return anonymizer


@pytest.mark.usefixtures("redactor")
@pytest.mark.parametrize("identity", NAMED)
def test_an_identity_the_config_names_is_refused_before_any_sample(tmp_path: Path, identity: str) -> None:
    anonymizer = _started(tmp_path)
    with pytest.raises(AnonymizationError):
        anonymizer.check(f"x {identity} y".encode())


@pytest.mark.usefixtures("redactor")
def test_a_wearables_own_bed_never_reaches_a_record_or_a_log_line(tmp_path: Path) -> None:
    anonymizer = _started(tmp_path)
    # A plain token passes the detail check: only the registry can tell that it is a bed.
    diagnostic = Diagnostic("ble_link", "ward3-bed12", time.time(), {"state": "icu_bed14"})
    assert anonymizer.seal(lambda: anonymizer.diagnostic(diagnostic), encode) is None
    assert anonymizer.dropped == 1
    # A model's first log line about the bed comes before any record of it.
    line = REDACTOR("models novelty: subject icu_bed14: commissioning on 3 inputs")
    assert "icu_bed14" not in line
    assert f"subject {anonymizer.log_label('subject', 'icu_bed14')}:" in line
    assert REDACTOR("line2-operator logged in") == "pump-plc.username logged in"


@pytest.mark.usefixtures("redactor")
def test_a_channel_named_like_a_key_is_no_identity(tmp_path: Path) -> None:
    anonymizer = _started(tmp_path)
    # The MCU's channel "device" maps to the metric name "winding_temp": data, not a device.
    anonymizer.check(b"x winding_temp y")


def test_a_support_bundle_redacts_every_identity_the_config_names(tmp_path: Path) -> None:
    named = set(identities(_config(tmp_path)))
    assert set(NAMED) <= named
    assert "winding_temp" not in named


def test_the_local_legend_lists_a_wearables_own_bed_before_it_sends_anything(tmp_path: Path) -> None:
    config = _config(tmp_path)
    rows = [line.split() for line in render(config).splitlines()[2:]]
    key = load_or_create_key(config.core.site_key_path)
    anonymizer = Anonymizer(Pseudonymizer(key), time_mode="relative")
    assert [anonymizer.subject_pseudonym("icu_bed14"), "subject", "icu_bed14", "ward3-wearables"] in rows
