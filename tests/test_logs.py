"""Log redaction: identities the gateway knows never reach a formatted log line unless enabled."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from gateway.anonymize import Anonymizer, Pseudonymizer
from gateway.logs import REDACTOR, IdentityRedactor, JournalFormatter, JsonFormatter
from gateway.sample import MDC, Stream

MAC = "C0:FF:EE:00:11:22"
MRN = "MRN-0099123"


@pytest.fixture
def redactor() -> Iterator[IdentityRedactor]:
    REDACTOR.clear()
    REDACTOR.enabled = True
    yield REDACTOR
    REDACTOR.clear()


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"device {MAC} refused")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("t", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_every_form_of_a_known_identity_is_replaced(redactor: IdentityRedactor) -> None:
    redactor.add(MAC, "strap.device")
    text = redactor(
        f"a {MAC} b {MAC.lower()} c {MAC.replace(':', '')} d /org/bluez/hci0/dev_{MAC.replace(':', '_')}"
    )
    assert text == "a strap.device b strap.device c strap.device d /org/bluez/hci0/dev_strap.device"
    assert redactor("no identity here") == "no identity here"
    redactor.add("abc", "too-short")  # would blank ordinary words: ignored
    assert redactor("abcdef") == "abcdef"


def test_formatters_redact_messages_args_and_tracebacks(redactor: IdentityRedactor) -> None:
    redactor.add(MAC, "strap.device")
    stream = Stream("strap", MRN, MAC, MDC["MDC_ECG_HEART_RATE"])
    record = _record("stream %s: lost", stream.key, exc=True)
    line = JournalFormatter(timestamps=False).format(record)
    obj = json.loads(JsonFormatter().format(record))
    assert MAC not in line
    assert "stream strap/strap.device/MDC_ECG_HEART_RATE: lost" in line
    assert "device strap.device refused" in line  # the traceback too
    assert MAC not in obj["msg"]
    assert MAC not in obj["exc"]
    redactor.enabled = False  # logging.identities = true
    assert MAC in JournalFormatter(timestamps=False).format(record)


def test_the_anonymizer_names_new_subjects_and_devices_by_pseudonym(redactor: IdentityRedactor) -> None:
    anon = Anonymizer(Pseudonymizer(b"k" * 32), time_mode="relative")
    anon.on_identity = redactor.add
    pseudonym = anon._subject(MRN)
    anon._device(MAC, "strap")
    assert redactor(f"anomaly on {MRN}") == f"anomaly on subject~{pseudonym}"
    assert redactor(MAC).startswith("device~")
