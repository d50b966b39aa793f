"""Anonymization: keyed pseudonyms, site key handling, fail-closed sealing."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from gateway.anonymize import Anonymizer, Pseudonymizer, identity_forms, load_or_create_key, rotate_key
from gateway.contracts import Alarm, AlarmKind, Diagnostic, Lane, StreamFeatures, WindowRecord
from gateway.errors import ConfigError
from gateway.records import AlarmRecord, FeaturesWindow, decode, encode
from gateway.sample import MDC, Metric, Stream

MAC = "A4:C1:38:5B:20:7E"
PATIENT = "MRN-0048213"
SPO2 = Stream("bed7-oxi", PATIENT, MAC, MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)


def _anon(key: bytes = b"k" * 32, **kw: object) -> Anonymizer:
    return Anonymizer(Pseudonymizer(key), time_mode=kw.pop("time_mode", "relative"), start_wall=1000.0, **kw)  # type: ignore[arg-type]


def _window(stream: Stream = SPO2) -> WindowRecord:
    sf = StreamFeatures(stream, 30, 0.0, {"mean": 97.0, "min": 95.0})
    return WindowRecord(PATIENT, "medical", 3, 30.0, 1030.0, 30.0, (sf,))


def test_pseudonyms_are_keyed_stable_and_per_purpose() -> None:
    p1, p2 = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert p1("device", MAC) == p1("device", MAC)
    assert p1("device", MAC) != p2("device", MAC)
    assert p1("device", MAC) != p1("subject", MAC)
    unkeyed = base64.b32encode(hashlib.sha256(MAC.encode()).digest()).decode().lower()
    assert p1("device", MAC) not in unkeyed
    assert len(p1("device", MAC)) == 16


def test_site_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "site.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key


def test_site_key_refused_when_open_to_others(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=r"chmod 600"):
        load_or_create_key(path)


def test_damaged_site_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="has 5 bytes, expected 32"):
        load_or_create_key(path)


def test_rotation_changes_pseudonyms_and_keeps_the_old_key(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    old = load_or_create_key(path)
    retired = rotate_key(path)
    new = load_or_create_key(path)
    assert old != new
    assert retired.read_bytes() == old
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Pseudonymizer(old)("subject", PATIENT) != Pseudonymizer(new)("subject", PATIENT)


def test_window_record_carries_no_identity() -> None:
    anon = _anon()
    sealed = anon.seal(lambda: anon.window(_window()), encode)
    assert sealed is not None
    rec, data = sealed
    assert rec.lane == Lane.FEATURES
    for form in identity_forms(MAC) | identity_forms(PATIENT) | identity_forms("bed7-oxi"):
        assert form not in data
    payload = decode(data)
    assert isinstance(payload, FeaturesWindow)
    assert payload.streams[0].features == {"mean": 97.0, "min": 95.0}
    assert payload.streams[0].mdc == 150456
    assert payload.t == 30.0  # relative to the gateway's start
    assert rec.topic == f"features/{payload.subject}"


def test_identity_hidden_in_a_metric_name_is_dropped_and_counted() -> None:
    anon = _anon()
    anon.register(PATIENT)
    leaky = Stream("s", "bed-x", "dev-1", Metric(f"ward/{PATIENT}/spo2", "%"))
    assert anon.seal(lambda: anon.window(_window(leaky)), encode) is None
    hexed = Stream("s", "bed-x", "dev-1", Metric(PATIENT.encode().hex(), "%"))
    assert anon.seal(lambda: anon.window(_window(hexed)), encode) is None
    b64 = Stream("s", "bed-x", "dev-1", Metric(base64.b64encode(PATIENT.encode()).decode(), "%"))
    assert anon.seal(lambda: anon.window(_window(b64)), encode) is None
    assert anon.dropped == 3


def test_mac_without_separators_and_as_raw_bytes_is_caught() -> None:
    forms = identity_forms(MAC)
    assert b"a4c1385b207e" in forms
    assert b"A4C1385B207E" in forms
    assert bytes.fromhex("a4c1385b207e") in forms


def test_free_text_in_alarm_detail_is_refused() -> None:
    anon = _anon()
    ok = Alarm(AlarmKind.SENSOR_FAULT, PATIENT, 1.0, 1001.0, SPO2, {"quality": 1, "cause": "probe_off"})
    sealed = anon.seal(lambda: anon.alarm(ok), encode)
    assert sealed is not None
    alarm = decode(sealed[1])
    assert isinstance(alarm, AlarmRecord)
    assert alarm.detail == {"quality": 1, "cause": "probe_off"}
    bad = Alarm(AlarmKind.SENSOR_FAULT, PATIENT, 1.0, 1001.0, SPO2, {"note": "Mr Smith pulled the probe"})
    assert anon.seal(lambda: anon.alarm(bad), encode) is None
    assert anon.dropped == 1


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("relative", 234.567), ("coarse", 200.0), ("exact", 1234.567)],
)
def test_time_modes(mode: str, expected: float) -> None:
    anon = _anon(time_mode=mode, coarsen_s=100.0)
    sealed = anon.seal(
        lambda: anon.diagnostic(Diagnostic("sim_label", None, 1234.567, {"event": "x"})), encode
    )
    assert sealed is not None
    assert decode(sealed[1]).t == pytest.approx(expected)


def test_identity_in_another_letter_case_is_caught() -> None:
    anon = _anon()
    anon.register("plant-a/pump-3")
    leaky = Stream("s", "bed-x", "dev-1", Metric("Plant-A/Pump-3/Motor/Current", "A"))
    assert anon.seal(lambda: anon.window(_window(leaky)), encode) is None


def test_identity_passed_as_a_number_is_refused() -> None:
    anon = _anon()
    anon.register("20931")
    alarm = Alarm(AlarmKind.SENSOR_FAULT, PATIENT, 1.0, 1001.0, SPO2, {"serial": 20931})
    assert anon.seal(lambda: anon.alarm(alarm), encode) is None
    ok = Alarm(AlarmKind.SENSOR_FAULT, PATIENT, 1.0, 1001.0, SPO2, {"battery": 12})
    assert anon.seal(lambda: anon.alarm(ok), encode) is not None


def test_token_with_a_trailing_newline_is_free_text() -> None:
    anon = _anon()
    bad = Alarm(AlarmKind.SENSOR_FAULT, PATIENT, 1.0, 1001.0, SPO2, {"cause": "probe_off\n"})
    assert anon.seal(lambda: anon.alarm(bad), encode) is None


def test_a_record_that_cannot_be_built_is_dropped_not_raised() -> None:
    anon = _anon(time_mode="coarse")
    alarm = Alarm(AlarmKind.SENSOR_LOST, PATIENT, 1.0, float("nan"), SPO2)
    assert anon.seal(lambda: anon.alarm(alarm), encode) is None
    assert anon.dropped == 1


def test_identity_clashing_with_the_gateways_own_words_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    anon = _anon()
    anon.register("pump")
    assert "also occurs in the gateway's own words" in caplog.text
