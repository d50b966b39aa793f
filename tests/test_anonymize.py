"""Anonymization: keyed pseudonyms, site key handling, fail-closed sealing."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import socket
import stat
from pathlib import Path

import cbor2
import pytest
from durability import synced_during

from gateway.alarms import with_priority
from gateway.anonymize import (
    RECORD_WORDS,
    VOCABULARY,
    Anonymizer,
    FormIndex,
    Pseudonymizer,
    cbor_texts,
    fold_scope,
    folded_forms,
    folded_hits,
    identity_forms,
    index_form,
    indexed_hits,
    load_or_create_key,
    rotate_key,
    text_forms,
)
from gateway.contracts import (
    Alarm,
    AlarmKind,
    Diagnostic,
    Estimate,
    Lane,
    StreamFeatures,
    WindowRecord,
)
from gateway.errors import AnonymizationError, ConfigError
from gateway.records import AlarmRecord, FeaturesWindow, decode, encode
from gateway.sample import MDC, Metric, Stream, industrial_metric

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


def test_rotation_changes_pseudonyms_and_keeps_the_old_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site.key"
    old = load_or_create_key(path)
    # The new key synced, then the folder after each rename: a power cut after the rotation
    # cannot bring the old key back under the new outbox and time base.
    synced = synced_during(monkeypatch, lambda: rotate_key(path))
    assert [p.name for p in synced][-1:] == [tmp_path.name]
    assert synced[0].name.startswith(".site.key.new.")
    assert synced.count(tmp_path) == 2
    retired = next(tmp_path.glob("site.key.retired-*"))
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
    alarm = Alarm(AlarmKind.SENSOR_LOST, PATIENT, float("nan"), 1001.0, SPO2)
    assert anon.seal(lambda: anon.alarm(alarm), encode) is None
    assert anon.dropped == 1


def test_identity_clashing_with_the_gateways_own_words_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    anon = _anon()
    anon.register("pump")
    assert "also occurs in the gateway's own words" in caplog.text


# ---- the scan looks inside each CBOR item, never across two ---------------------------------------

DEV_P = Stream("plc", "line2-m3", "DEV-P", Metric("Pump1/Pressure", "bar"), "industrial", 1.0)


def test_a_device_whose_compact_name_spans_two_cbor_items_is_sent() -> None:
    # "DEV-P" compacts to "devp": the key "dev" and the header byte (0x70, "p") of the 16-character
    # pseudonym after it.  No reader sees "devp"; every window of that device used to be refused.
    anon = _anon()
    sealed = anon.seal(lambda: anon.window(_window(DEV_P)), encode)
    assert sealed is not None, "refused"
    _, data = sealed
    assert b"devp" in data  # what the whole-record scan matched
    window = decode(data)
    assert isinstance(window, FeaturesWindow)
    assert window.streams[0].dev == Pseudonymizer(b"k" * 32)("device", "DEV-P")
    assert anon.dropped == 0


@pytest.mark.parametrize(
    ("identity", "item"),
    [
        ("DEV-P", {"dev": "p" * 16}),  # a key's tail, then a string's header byte (16 chars: "p")
        ("KIND-J", {"kind": "industrial"}),  # the same before a 10-character value ("j")
        ("C-DEV", {"dev": 1}),  # a 3-character key's own header byte ("c") before it
        ("3333", [-20, -20, -20, -20]),  # small negative integers are one byte each: "3"
        ("BC-D7", [98, "d7x"]),  # an integer's argument byte (98: "b"), a string's header, its text
    ],
)
def test_a_form_across_item_boundaries_is_no_identity(identity: str, item: object) -> None:
    anon = _anon()
    anon.register(identity)
    data = cbor2.dumps(item, canonical=True)
    with pytest.raises(AnonymizationError):
        anon.check(data)  # the bytes as a whole hold a form of it
    anon.check_cbor(data)  # no item does


@pytest.mark.parametrize(
    "item",
    [
        {"dev": "devp"},  # a value
        {"devp": 1},  # a key
        [1, [{"x": {"y": "Dev-P"}}]],  # nested, in another letter case
        {"n": "pump1/DEVP/pressure"},  # inside a longer name, compacted
        {"n": "pump1/dev-p/pressure"},
        {"x": b"devp"},  # a byte string
        {"x": "646576702"},  # hex
        {"x": base64.b64encode(b"DEV-P").decode()},  # base64
        {"x": [bytes.fromhex("a4c1385b207e")]},  # the MAC's own bytes
        {"x": 0xA4C1385B207E},  # the MAC passed as a number
    ],
)
def test_an_identity_inside_an_item_is_refused_wherever_it_sits(item: object) -> None:
    anon = _anon()
    anon.register("DEV-P")
    anon.register(MAC)
    with pytest.raises(AnonymizationError, match="appears in an outgoing record"):
        anon.check_cbor(cbor2.dumps(item, canonical=True))


PSEUDO = b"\x63dev\x70" + b"p" * 16  # {"dev": <16 characters>} without its map head: "devp" across items


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f" + PSEUDO + b"\xff",  # an indefinite-length array (canonical CBOR has none)
        PSEUDO[:-6],  # a string cut short
        PSEUDO + b"\x1b\x00",  # an integer's head cut short
    ],
)
def test_cbor_the_scan_cannot_read_item_by_item_is_refused(data: bytes) -> None:
    anon = _anon()
    anon.register("DEV-P")
    anon.check_cbor(PSEUDO)  # whole, the same items pass
    with pytest.raises(AnonymizationError, match="record dropped"):
        anon.check_cbor(data)


def test_the_indexed_scan_finds_what_searching_for_every_form_finds() -> None:
    # The scan reads a record's 4-byte strings against its forms' first 4 bytes; it must refuse
    # exactly what searching the record for each form (lower-cased for text and hex) refuses.
    rng = random.Random(3)
    identities = [MAC, PATIENT, "bed7-oxi", "DEV-P", "Plant-A/Pump-3", "SN 20931"]
    anon = _anon()
    for identity in identities:
        anon.register(identity)
    forms = set().union(*map(identity_forms, identities))
    short = [i.casefold() for i in (*identities, socket.gethostname()) if 2 <= len(i.encode()) < 4]
    folded = {f for i in identities for f in text_forms(i) if len(f) >= 4}
    every = sorted(forms | folded)
    refused = 0
    for _ in range(3000):
        data = bytearray(rng.randbytes(rng.randrange(0, 40)))
        if rng.random() < 0.5:  # a form, or most of one, in a random letter case somewhere
            form = rng.choice(every)[: rng.choice((3, 4, 100))]
            form = bytes(b ^ 0x20 if rng.random() < 0.3 and chr(b).isalpha() else b for b in form)
            at = rng.randrange(0, len(data) + 1)
            data[at:at] = form
        # An identity under 4 bytes (the host name may be one) counts as a word of the text.
        text = bytes(data).decode("utf-8", "surrogateescape").casefold()
        expected = (
            any(f in data for f in forms)
            or any(f in data.lower() for f in folded)
            or any(re.search(rf"(?<![^\W_]){re.escape(w)}(?![^\W_])", text) for w in short)
        )
        try:
            anon.check(bytes(data))
        except AnonymizationError:
            assert expected, bytes(data)
            refused += 1
        else:
            assert not expected, bytes(data)
    assert refused > 200  # both sides of the comparison were exercised


def _occurrences(text: bytes, forms: set[bytes]) -> list[tuple[int, int]]:
    """Every (start, end) of every form in ``text``, by searching for each form in turn."""
    spans = []
    for form in forms:
        at = text.find(form)
        while at >= 0:
            spans.append((at, at + len(form)))
            at = text.find(form, at + 1)
    return sorted(spans)


def test_forms_sharing_their_first_bytes_are_each_found_where_they_occur() -> None:
    # A plant's machines line2-m1... and its tags Line3/...: every form starts with "line".  The
    # index compares an occurrence of a 4-byte string once per length of the forms it starts; it
    # must give every span that searching for each form gives, in records of tags, forms and noise.
    rng = random.Random(5)
    identities = [f"line2-m{i}" for i in range(1, 400, 2)]
    identities += ["Line2", "line2-m1-spare", "LINE2/PRESS", MAC, "SN 20931", "linen"]
    forms = set().union(*map(identity_forms, identities))
    folded = {f for i in identities for f in text_forms(i) if len(f) >= 4}
    exact: FormIndex[bytes] = {}
    lower: FormIndex[bytes] = {}
    for form in forms:
        index_form(exact, form)
    for form in folded:
        index_form(lower, form)
    pieces = [*sorted(forms | folded), b"Line3/EMG/electrode-07", b"line", b"LINE2-", b"\x00"]
    anon = _anon()
    for identity in identities:
        anon.register(identity)
    short = [h.casefold() for h in (socket.gethostname(),) if 2 <= len(h.encode()) < 4]
    found = 0
    for _ in range(1500):
        data = bytearray(rng.randbytes(rng.randrange(0, 24)).translate(bytes(range(128)) * 2))
        for _ in range(rng.randrange(0, 6)):
            piece = rng.choice(pieces)[: rng.choice((3, 5, 8, 100))]
            piece = bytes(b ^ 0x20 if rng.random() < 0.3 and chr(b).isalpha() else b for b in piece)
            at = rng.randrange(0, len(data) + 1)
            data[at:at] = piece
        text = bytes(data)
        lowered = text.lower()
        grams = {lowered[i : i + 4] for i in range(len(lowered) - 3)}
        assert sorted(indexed_hits(exact, text, lowered, grams)) == _occurrences(text, forms), text
        expected = _occurrences(lowered, folded)
        assert sorted(indexed_hits(lower, lowered, lowered, grams)) == expected, text
        found += bool(expected)
        refused = True
        try:
            anon.check(text)
        except AnonymizationError:
            pass
        else:
            refused = False
        # The host name is registered too; when it has 2-3 characters it counts as a word.
        word = any(
            re.search(rf"(?<![^\W_]){re.escape(w)}(?![^\W_])", text.decode("latin-1").casefold())
            for w in short
        )
        assert refused == bool(expected or _occurrences(text, forms) or word), text
    assert 300 < found < 1200  # records with and without a form were both exercised


def _spelt(rng: random.Random, text: str) -> str:
    """``text`` with each letter in a random one of its cases."""
    return "".join(rng.choice((c, c.upper(), c.title(), c.lower())) for c in text)


def test_folded_forms_sharing_their_start_are_each_found_where_they_occur() -> None:
    # Identities outside ASCII, hundreds starting alike (beds Bett-Ä..., rooms Zimmer-Müller-...):
    # the folded text is searched once per start the forms share; it must give the spans that
    # searching for each form gives, and the scan must refuse exactly the records holding one,
    # in any letter case, beside letters folding otherwise (µ, ß, the Kelvin sign, a ligature).
    rng = random.Random(7)
    identities = [f"Bett-Ä{i}" for i in range(150)] + [f"Zimmer-Müller-{i}" for i in range(0, 300, 3)]
    identities += ["Gerät-7", "Straße-9", "ᏣᎳᎩ-1", "Ǆemal"]
    forms = {f for i in identities for f in folded_forms(i) if len(f.encode()) >= 4}
    index: FormIndex[str] = {}
    for form in forms:
        index_form(index, form, lower=False)
    each = {form: {len(form): {form}} for form in forms}  # one search a form
    byte_forms = set().union(*map(identity_forms, identities))
    lower_forms = {f for i in identities for f in text_forms(i) if len(f) >= 4}
    anon = _anon()
    for identity in identities:
        anon.register(identity)
    short = [h.casefold() for h in (socket.gethostname(),) if 2 <= len(h.encode()) < 4]
    pieces = [*identities, "µV", "ß", "\u212a", "\ufb01", "Bett-", "ZIMMER-", "mÜller", "line3/emg"]
    found = 0
    for _ in range(1500):
        data = bytearray(rng.randbytes(rng.randrange(0, 12)).translate(bytes(range(128)) * 2))
        for _ in range(rng.randrange(0, 5)):
            piece = _spelt(rng, rng.choice(pieces))[: rng.choice((3, 6, 100))].encode()
            at = rng.randrange(0, len(data) + 1)
            data[at:at] = piece
        if rng.random() < 0.2:  # bytes that are no UTF-8 stay themselves
            data.insert(rng.randrange(0, len(data) + 1), 0xFF)
        text = bytes(data)
        expected = sorted(folded_hits(text, each))
        assert sorted(folded_hits(text, index)) == expected, text
        found += bool(expected)
        decoded = text.decode("utf-8", "surrogateescape").casefold()
        leak = (
            bool(expected)
            or any(f in text for f in byte_forms)
            or any(f in text.lower() for f in lower_forms)
            or any(re.search(rf"(?<![^\W_]){re.escape(w)}(?![^\W_])", decoded) for w in short)
        )
        try:
            anon.check(text)
        except AnonymizationError:
            assert leak, text
        else:
            assert not leak, text
    assert 300 < found < 1200  # records with and without a form were both exercised


def _leaks(anon: Anonymizer, name: str) -> bool:
    """Whether a window whose metric is named ``name`` is refused (sealed through the real encoder)."""
    leaky = Stream("s", "bed-x", "dev-1", Metric(f"ward/{name}/spo2", "%"))
    return anon.seal(lambda: anon.window(_window(leaky)), encode) is None


@pytest.mark.parametrize(
    "written", ["bett-Ä1", "bETT-Ä1", "BeTt-ä1", "bettÄ1", "bett-ä1", "BETT-Ä1", "BETTÄ1"]
)
def test_an_identity_outside_ascii_is_found_in_any_letter_case(written: str) -> None:
    anon = _anon()
    anon.register("Bett-Ä1")
    assert _leaks(anon, written)
    with pytest.raises(AnonymizationError):
        anon.check_texts(["ward", written])
    assert anon.holds_identity(f"x {written} y")
    # Inside one CBOR item after other items holding letters outside ASCII (the folded text's
    # offsets are mapped back to the item's bytes), and not across two items.
    with pytest.raises(AnonymizationError):
        anon.check_cbor(cbor2.dumps({"a": "Ärger über Öl", "b": [1.5, f"x/{written}/y"]}, canonical=True))
    anon.check_cbor(cbor2.dumps(["Ärger", "bett-", "ä1"], canonical=True))
    assert not _leaks(anon, "bett-a1")  # another letter is another name


@pytest.mark.parametrize(
    ("identity", "written"),
    [
        ("Straße-4", "STRASSE-4"),  # folds to "strasse-4"
        ("Straße-4", "strasse-4"),
        ("Kessel-9", "\u212aessel-9"),  # a Kelvin sign folds to "k"
        ("Flow-7", "\ufb02ow-7"),  # the ligature "fl"
    ],
)
def test_letters_that_fold_to_another_spelling_are_found(identity: str, written: str) -> None:
    anon = _anon()
    anon.register(identity)
    assert _leaks(anon, written)
    assert not _leaks(anon, "spo2")


def test_a_unit_in_micro_folds_only_identities_outside_ascii() -> None:
    # µ folds to Greek mu, and units keep it (µV, µS/cm): a record holding it is folded whole once an
    # identity outside ASCII is known, but only those identities can be spelt there in a case the
    # byte scan misses; a letter folding to an ASCII one (the Kelvin sign) may spell any identity.
    micro = "Rig/EMG µV".encode()
    assert fold_scope(micro, outside_ascii=False) == "none"
    assert fold_scope(micro, outside_ascii=True) == "outside_ascii"
    assert fold_scope("\u212aessel µV".encode(), outside_ascii=True) == "all"
    assert fold_scope("Ärger".encode(), outside_ascii=True) == "anchored"
    assert fold_scope(b"Rig/EMG uV", outside_ascii=True) == "none"
    anon = _anon()
    for identity in ("Zimmer-Müller-12", "Kessel-9", "MRN-0048213"):
        anon.register(identity)
    for written in ("ZIMMER-MÜLLER-12", "zimmer-müller-12", "mrn-0048213", "Mrn-0048213", "\u212aessel-9"):
        assert anon.holds_identity(f"ch01 µV {written}"), written
        with pytest.raises(AnonymizationError):
            anon.check_cbor(cbor2.dumps({"u": "µV", "m": f"x/{written}/y"}, canonical=True))
    anon.check_cbor(cbor2.dumps({"u": "µV", "m": "Rig/EMG/channel-01"}, canonical=True))


@pytest.mark.parametrize(
    "written",
    [
        "ab-cd-ef-01-02-03",
        "abcdef010203",
        "abcd.ef01.0203",
        "AB CD EF 01 02 03",
        "ab.cd.ef.01.02.03",
        "AbCd.Ef01.0203",
    ],
)
def test_a_mac_address_is_found_in_any_of_its_spellings(written: str) -> None:
    for registered in ("AB:CD:EF:01:02:03", "ab-cd-ef-01-02-03", "abcd.ef01.0203"):
        anon = _anon()
        anon.register(registered)
        assert _leaks(anon, written), (registered, written)
        with pytest.raises(AnonymizationError):
            anon.check_texts([written])


def test_a_short_identity_is_a_word_of_a_text_item_never_raw_bytes() -> None:
    # A 3-character bed label: inside a text item, standing as a word, it names the bed; inside a
    # longer word, a byte string or a number's bytes it is no identity (3 bytes occur anywhere).
    anon = _anon()
    anon.register("B12")
    for written in ("B12", "b12", "Bed B12", "ward3/b12/spo2", "B12-left"):
        assert _leaks(anon, written), written
        with pytest.raises(AnonymizationError):
            anon.check_cbor(cbor2.dumps({"n": written}, canonical=True))
    for other in ("B123", "AB12", "b12x"):
        assert not _leaks(anon, other), other
    anon.check_cbor(cbor2.dumps({"x": b"B12", "y": 0x423132, "z": b"bed B12"}, canonical=True))
    with pytest.raises(AnonymizationError):
        anon.check(b"alarms/b12")  # a topic is one text
    with pytest.raises(AnonymizationError):
        anon.check_texts(["Pump", "B12"])
    assert anon.holds_identity("bed b12")
    # Its own records go: the subject's pseudonym is 16 letters and digits, no word "b12".
    bed = Stream("bed12-ox", "B12", "OX-12", MDC["MDC_PULS_OXIM_SAT_O2"], rate_hz=1.0)
    sealed = anon.seal(
        lambda: anon.window(
            WindowRecord(
                "B12", "medical", 3, 30.0, 1030.0, 30.0, (StreamFeatures(bed, 30, 0.0, {"mean": 97.0}),)
            )
        ),
        encode,
    )
    assert sealed is not None
    # One character is no identity anyone can scan for: every record holds it.
    anon.register("7")
    assert not _leaks(anon, "bed 7")


def test_a_short_source_name_is_not_scanned_as_a_word_of_its_own_metrics() -> None:
    # A plant names its source "tep" and its tags "TEP/v01"...: as a word that name would drop every
    # record the source sends. A source's name is a label; the identity it may stand for is its
    # subject, and a short subject is still scanned as a word.
    anon = _anon()
    plc = Stream("tep", "tep-plant", "TEP-SIM", industrial_metric("TEP/v01", "1"), "industrial", 1 / 180)
    anon.register("tep", words=False)
    assert anon.source_label("tep").startswith("source~")
    sealed = anon.seal(
        lambda: anon.window(
            WindowRecord(
                "tep-plant",
                "industrial",
                3,
                180.0,
                1180.0,
                180.0,
                (StreamFeatures(plc, 1, 0.0, {"mean": 1.0}),),
            )
        ),
        encode,
    )
    assert sealed is not None
    assert not anon.holds_identity("TEP/v01")
    anon.register("tep")  # the same text as a subject: scanned as a word from then on
    assert anon.holds_identity("TEP/v01")
    assert anon.holds_identity("tep-plant")  # a long form, as before, whatever registered it


def test_every_short_word_of_the_records_own_is_known_to_the_clash_warning() -> None:
    # A record's keys, units and tokens of 2-3 bytes: an identity equal to one drops every record.
    anon = _anon()
    with_level = with_priority(Alarm(AlarmKind.LIMIT, PATIENT, 1.0, 1001.0, SPO2, {"level": "low"}))
    est = Estimate(PATIENT, "medical", "hr", "/min", 1.0, 1001.0, 70.0, 1.0, "measured", ((SPO2, 1.0),), {})
    records = [
        anon.window(_window()),
        anon.alarm(with_level),
        anon.diagnostic(Diagnostic("counters", None, 1001.0, {"sent": 1})),
        anon.estimate(est),
    ]
    words = set()
    for rec in records:
        data = encode(rec.payload)
        for a, b in cbor_texts(data):
            words |= {w for w in re.split(r"[^a-z0-9]+", data[a:b].decode().casefold()) if 2 <= len(w) <= 3}
    vocabulary = {w for word in VOCABULARY for w in re.split(r"[^a-z0-9]+", word)}
    assert words  # the records were read
    assert words - vocabulary - RECORD_WORDS == set()


def test_a_short_identity_that_is_a_word_of_the_gateways_own_is_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    anon = _anon()
    for word in ("max", "Dev", "hr"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="gateway.anonymize"):
            anon.register(word)
        assert any("also occurs in the gateway's own words" in r.getMessage() for r in caplog.records), word
