"""Fail-closed anonymization: what leaves the gateway carries keyed pseudonyms only.

Identities (subject ids, device MACs and serials, source names, the gateway's name and host name)
exist only on the gateway.  Outgoing records are *built* from an allow-list of fields - metric
names, units, numbers, pseudonyms, short vocabulary tokens - never copied from raw objects, and
every encoded record is then scanned for every identity seen so far, in raw, hex and base64 form.
The scan looks inside each CBOR item (every text and byte string, key or value, and a number's own
bytes), never across two: the key ``dev`` followed by the header byte of a 16-character string
reads ``devp``, which is no device's name.  A record that fails either step is dropped and
counted, never sent.

Pseudonyms are HMAC-SHA-256 under a per-purpose key derived from a site key (32 random bytes
created at first start, mode 0600).  An unkeyed hash of a MAC or serial number can be reversed by
enumeration; a keyed one cannot without the site key.  Rotating the key breaks linkage on purpose.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.config_base import secret_file_problem
from gateway.contracts import Alarm, AlarmKind, Diagnostic, Estimate, Lane, WindowRecord
from gateway.errors import AnonymizationError, ConfigError
from gateway.legend import Legend
from gateway.records import (
    AlarmRecord,
    Clock,
    DiagnosticRecord,
    EstimateRecord,
    EstimateSource,
    FeaturesWindow,
    Record,
    StreamWindow,
)
from gateway.records.units import to_ucum
from gateway.timebase import TimeBase

log = logging.getLogger(__name__)

KEY_BYTES = 32
PSEUDONYM_CHARS = 16  # base32 characters = 80 bits: collision-free for any realistic fleet
# Free-text values are never sent; a string in a record's detail must be a short token.
_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,31}")  # used with fullmatch: no trailing newline
_DEVICE_KINDS = frozenset({AlarmKind.DEVICE_LOST, AlarmKind.DEVICE_RESTORED})


def _finite(x: float | None) -> float | None:
    """``x`` as a float, or None when it is absent or not a finite number."""
    return float(x) if x is not None and math.isfinite(x) else None


def _write_key_file(path: Path) -> None:
    """Write a new random key to ``path`` atomically: a crash leaves no key or a whole one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(KEY_BYTES))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails if a key appeared meanwhile: that one wins
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_key(path: Path) -> bytes:
    """Read the site key, creating it (mode 0600, atomically) on first start."""
    problem = secret_file_problem(path, must_exist=False)
    if problem:
        expected, found = problem
        raise ConfigError(f"anonymizer {path}: site key refused: expected {expected}, found {found}")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_key_file(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"anonymizer {path}: cannot create the site key: {exc.strerror}: "
                "make the state directory writable by the gateway's user"
            ) from exc
        else:
            log.info("anonymizer: created a new site key at %s", path)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"anonymizer {path}: site key has {len(key)} bytes, expected {KEY_BYTES}: "
            "the file is damaged; move it away and restart to create a new key (pseudonyms will change)"
        )
    return key


def rotate_key(path: Path) -> Path:
    """Replace the site key with a new one; the old one is kept beside it, renamed, for the operator."""
    retired = path.with_name(f"{path.name}.retired-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if path.exists():
        # A hard link first: at every moment either the old or the new key is at ``path``.
        os.link(path, retired)
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)
    _write_key_file(new)
    new.replace(path)
    return retired


class Pseudonymizer:
    """Keyed, per-purpose pseudonyms: same identity and key give the same pseudonym."""

    def __init__(self, site_key: bytes) -> None:
        if len(site_key) < 16:
            raise ValueError("Pseudonymizer: site key too short: need at least 16 random bytes")
        self._keys: dict[str, bytes] = {}
        self._site_key = site_key
        self._cache: dict[tuple[str, str], str] = {}

    def _purpose_key(self, purpose: str) -> bytes:
        key = self._keys.get(purpose)
        if key is None:
            # Separate keys per purpose: a subject pseudonym cannot be matched to a device one.
            key = hmac.new(self._site_key, b"edgetwin/pseudonym/" + purpose.encode(), hashlib.sha256).digest()
            self._keys[purpose] = key
        return key

    def __call__(self, purpose: str, identity: str) -> str:
        """The pseudonym of ``identity`` for ``purpose`` (e.g. "subject", "device", "gateway")."""
        cached = self._cache.get((purpose, identity))
        if cached is not None:
            return cached
        digest = hmac.new(self._purpose_key(purpose), identity.encode(), hashlib.sha256).digest()
        value = base64.b32encode(digest).decode("ascii").lower()[:PSEUDONYM_CHARS]
        self._cache[(purpose, identity)] = value
        return value


def text_forms(identity: str) -> set[bytes]:
    """Lower-cased text and hex forms of an identity, for a case-insensitive scan."""
    compact = re.sub(r"[:\-\s.]", "", identity)
    out = set()
    for form in {identity.lower(), compact.lower()}:
        raw = form.encode()
        out |= {raw, binascii.hexlify(raw)}
    return out


#: Words the gateway itself writes into records and topics. An identity inside one of them would
#: make every such record fail the scan, so registering one is warned about.
VOCABULARY = (
    "features",
    "alarms",
    "estimates",
    "diag/gateway",
    "counters",
    "sim_label",
    *("mean", "std", "min", "max", "slope", "rmssd", "sdnn", "pnn50", "missing"),
    *(
        m.lower()
        for m in ("MDC_PULS_OXIM_SAT_O2", "MDC_ECG_HEART_RATE", "MDC_ECG_TIME_PD_RR_GL", "MDC_RESP_RATE")
    ),
    "pump_skab",
    "vitals_mimic",
    "rr_ectopic",
    *("rr_rhythm", "bigeminy", "trigeminy", "couplet", "pause", "frequent", "coupling", "burden"),
)


def identity_forms(identity: str) -> set[bytes]:
    """The byte strings under which an identity could leak: raw, case variants, hex and base64."""
    forms: set[str] = {identity, identity.lower(), identity.upper()}
    compact = re.sub(r"[:\-\s.]", "", identity)
    if compact != identity and len(compact) >= 4:
        forms |= {compact, compact.lower(), compact.upper()}
    out: set[bytes] = set()
    for form in forms:
        raw = form.encode()
        out.add(raw)
        out.add(binascii.hexlify(raw))
        out.add(binascii.hexlify(raw).upper())
        for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw), base64.b32encode(raw)):
            out.add(enc.rstrip(b"="))
    # A MAC written as hex is also its raw 6 bytes.
    if re.fullmatch(r"[0-9A-Fa-f]{12}", compact):
        out.add(bytes.fromhex(compact))
    return {f for f in out if len(f) >= 4}


def _leak(size: int) -> AnonymizationError:
    # Never name the identity itself: the log may leave the gateway too.
    return AnonymizationError(
        f"anonymizer: an identity ({size}-byte form) appears in an outgoing record: "
        "record dropped; check metric names and driver metadata for identifiers"
    )


def cbor_leaves(data: bytes) -> list[tuple[int, int]]:
    """Where each CBOR item's own bytes lie in ``data`` (strings' content, numbers' argument), in order (pure)."""
    leaves: list[tuple[int, int]] = []
    i, end = 0, len(data)
    while i < end:
        major, info = data[i] >> 5, data[i] & 0x1F
        i += 1
        start, size = i, info
        if 24 <= info <= 27:
            i += 1 << (info - 24)
            size = int.from_bytes(data[start:i], "big")
        elif info > 27:
            # Indefinite lengths and reserved values: canonical CBOR (our encoder) has none.
            raise AnonymizationError(
                f"anonymizer: byte {i - 1} of a record is an indefinite-length or reserved CBOR item: "
                "it cannot be scanned item by item: record dropped"
            )
        if i > end:
            raise AnonymizationError("anonymizer: a record ends inside a CBOR item's head: record dropped")
        if major in (2, 3):  # byte and text strings: their content, whatever it holds
            if i + size > end:
                raise AnonymizationError("anonymizer: a record ends inside a CBOR string: record dropped")
            leaves.append((i, i + size))
            i += size
        elif i > start and major in (0, 1, 7):  # integers and floats: a MAC passed as a number is caught
            leaves.append((start, i))
        # Arrays, maps and tags: their items follow inline and are read in turn.
    return leaves


def _within_one(span: tuple[int, int], leaves: list[tuple[int, int]]) -> bool:
    """Whether ``span`` lies inside one of ``leaves`` (sorted, not overlapping)."""
    k = bisect.bisect_right(leaves, (span[0], math.inf)) - 1
    return k >= 0 and leaves[k][0] <= span[0] and span[1] <= leaves[k][1]


@dataclass(frozen=True, slots=True)
class OutRecord:
    """An anonymized record, ready to encode: its lane, relative topic and payload."""

    lane: Lane
    topic: str
    payload: Record
    t_wall: float  # real creation time, for the outbox's age budget (never encoded)


TimeMode = Literal["relative", "coarse", "exact"]


class Anonymizer:
    """Turns window records, alarms and diagnostics into identifier-free payloads, fail-closed."""

    def __init__(
        self,
        pseudonym: Pseudonymizer,
        *,
        time_mode: TimeMode,
        coarsen_s: float = 60.0,
        start_wall: float | None = None,
        local_identities: Iterable[str] = (),
        timebase: TimeBase | None = None,
        legend: Legend | None = None,
    ) -> None:
        self._p = pseudonym
        self._time_mode = time_mode
        self._coarsen_s = coarsen_s
        # Record time and run: persisted in the state directory by the runtime; in memory otherwise.
        self.timebase = timebase or TimeBase.ephemeral(start_wall)
        # Which pseudonym is which identity, for technicians on site (local only, never sent).
        self.legend = legend or Legend(None)
        # Every form by its first 4 bytes, lower-cased (forms are 4 bytes or more): a record is read
        # once for its 4-byte strings instead of once per form (thousands, with a fleet's identities).
        self._forms: dict[bytes, set[bytes]] = {}
        self._folded: dict[bytes, set[bytes]] = {}  # lower-cased text and hex forms, for the case-blind scan
        self._registered: set[str] = set()
        # Told (identity, log label) the first time a subject or device is seen: the log redactor.
        self.on_identity: Callable[[str, str], None] | None = None
        self.dropped = 0  # records refused because they could not be proven anonymous
        for identity in (socket.gethostname(), *local_identities):
            self.register(identity)

    def register(self, identity: str) -> None:
        """Add an identity whose every form must never appear in an outgoing record."""
        if identity and identity not in self._registered:
            self._registered.add(identity)
            for form in identity_forms(identity):
                # By the lower-cased first bytes: one read of the lower-cased record finds both kinds.
                self._forms.setdefault(form[:4].lower(), set()).add(form)
            for form in text_forms(identity):
                if len(form) >= 4:
                    self._folded.setdefault(form[:4], set()).add(form)
            clash = [word for word in VOCABULARY if len(identity) >= 4 and identity.lower() in word]
            if clash:
                log.warning(
                    "anonymizer: the identity %r also occurs in the gateway's own words (%s): every record "
                    "carrying them will be dropped; rename the source, subject or gateway",
                    identity,
                    ", ".join(clash[:3]),
                )

    def gateway_pseudonym(self, name: str) -> str:
        """The pseudonym that names this gateway on the wire."""
        self.register(name)
        self.legend.note("gateway", name)
        return self._p("gateway", name)

    def subject_pseudonym(self, subject: str) -> str:
        """The pseudonym a subject travels under (for local views that must not show the subject)."""
        return self._subject(subject)

    @property
    def _clock(self) -> Clock:
        return "unix" if self._time_mode == "exact" else "site"

    def record_time(self, t_wall: float) -> float:
        """A wall-clock time in the clock the records carry (as privacy.time says)."""
        return self._t(t_wall)

    def _t(self, t_wall: float) -> float:
        """Record time: seconds since the site origin (coarsened as configured), or exact Unix time."""
        if not math.isfinite(t_wall):
            raise AnonymizationError("anonymizer: record time is not a finite number: refused")
        if self._time_mode == "relative":
            return round(self.timebase.site(t_wall), 3)
        if self._time_mode == "coarse":
            return math.floor(self.timebase.site(t_wall) / self._coarsen_s) * self._coarsen_s
        return round(self.timebase.unix(t_wall), 3)

    def log_label(self, purpose: str, identity: str) -> str:
        """How logs name an identity: its purpose and the pseudonym records carry (``subject~k3n...``)."""
        return f"{purpose}~{self._p(purpose, identity)}"

    def _subject(self, subject: str) -> str:
        if subject not in self._registered and self.on_identity is not None:
            self.on_identity(subject, self.log_label("subject", subject))
        self.register(subject)
        self.legend.note("subject", subject)
        return self._p("subject", subject)

    def _device(self, device: str, source: str) -> str:
        if device not in self._registered and self.on_identity is not None:
            self.on_identity(device, self.log_label("device", device))
        self.register(device)
        self.register(source)
        self.legend.note("device", device, source)
        return self._p("device", device)

    def _detail(self, detail: Mapping[str, float | str]) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        for key, value in detail.items():
            if not _TOKEN.fullmatch(key):
                raise AnonymizationError(
                    f"anonymizer: detail key {key[:3]!r}... is not a plain token: refused"
                )
            if isinstance(value, str):
                if not _TOKEN.fullmatch(value):
                    raise AnonymizationError(f"anonymizer: detail {key!r} holds free text: refused")
                out[key] = value
            elif isinstance(value, int | float) and math.isfinite(value):
                # CBOR writes integers in binary, out of the byte scan's sight: a serial number
                # passed as a number is caught here instead.
                if float(value).is_integer() and str(int(value)) in self._registered:
                    raise AnonymizationError(
                        f"anonymizer: detail {key!r} holds an identity as a number: refused"
                    )
                out[key] = value
        return out

    def window(self, rec: WindowRecord) -> OutRecord:
        """A window of features; raises AnonymizationError when it cannot be made safe."""
        subject = self._subject(rec.subject)
        streams = []
        for sf in rec.streams:
            metric = sf.stream.metric
            streams.append(
                StreamWindow(
                    metric=metric.name,
                    unit=to_ucum(metric.unit),
                    dev=self._device(sf.stream.device, sf.stream.source),
                    n=sf.count,
                    missing=round(sf.missing, 4),
                    mdc=metric.mdc,
                    gap=sf.gap,
                    features={k: float(v) for k, v in sf.features.items() if math.isfinite(v)},
                    shape=metric.shape,
                )
            )
        payload = FeaturesWindow(
            subject=subject,
            kind=rec.kind,
            t=self._t(rec.end_wall),
            win=rec.length_s,
            streams=tuple(streams),
            scores={k: float(v) for k, v in rec.scores.items() if math.isfinite(v)},
            run=self.timebase.run,
            clock=self._clock,
        )
        return OutRecord(Lane.FEATURES, f"features/{subject}", payload, rec.end_wall)

    def alarm(self, alarm: Alarm) -> OutRecord:
        """An alarm record, with the contributing values."""
        subject = self._subject(alarm.subject)
        stream = alarm.stream
        payload = AlarmRecord(
            alarm=alarm.kind.value,
            subject=subject,
            t=self._t(alarm.t_wall),
            dev=None if stream is None else self._device(stream.device, stream.source),
            # A device alarm names the device, not one of its streams.
            metric=None if stream is None or alarm.kind in _DEVICE_KINDS else stream.metric.name,
            detail=self._detail(alarm.detail),
            contrib={k: float(v) for k, v in alarm.contributions.items() if math.isfinite(v)},
            alarm_class=alarm.alarm_class.value,
            # Alarm semantics (IEC 60601-1-8 / ISA-18.2): class, priority, limit, value, time held.
            priority=None if alarm.priority is None else alarm.priority.value,
            limit=_finite(alarm.limit),
            value=_finite(alarm.value),
            held_s=_finite(alarm.held_s),
            run=self.timebase.run,
            clock=self._clock,
        )
        return OutRecord(Lane.ALARMS, f"alarms/{subject}", payload, alarm.t_wall)

    def diagnostic(self, diag: Diagnostic) -> OutRecord:
        """A diagnostic record (gateway health, simulator ground truth)."""
        if not _TOKEN.fullmatch(diag.kind):
            raise AnonymizationError("anonymizer: diagnostic kind is not a plain token: refused")
        subject = None if diag.subject is None else self._subject(diag.subject)
        payload = DiagnosticRecord(
            diag=diag.kind,
            t=self._t(diag.t_wall),
            subject=subject,
            detail=self._detail(diag.detail),
            run=self.timebase.run,
            clock=self._clock,
        )
        topic = "diag/gateway" if subject is None else f"diag/{subject}"
        return OutRecord(Lane.DIAGNOSTICS, topic, payload, diag.t_wall)

    # --- state estimates (gateway.estimation; docs/records.md "Estimate records") ---------------

    def estimate(self, est: Estimate) -> OutRecord:
        """A state estimate with its uncertainty and the (pseudonymous) streams that fed it."""
        if not (_TOKEN.fullmatch(est.name) and _TOKEN.fullmatch(est.state)):
            raise AnonymizationError("anonymizer: estimate name or state is not a plain token: refused")
        subject = self._subject(est.subject)
        measured = math.isfinite(est.value) and math.isfinite(est.sd)
        payload = EstimateRecord(
            subject=subject,
            kind=est.kind,
            t=self._t(est.t_wall),
            est=est.name,
            unit=to_ucum(est.unit),
            state=est.state,
            value=float(est.value) if measured else None,
            sd=float(est.sd) if measured else None,
            src=tuple(
                EstimateSource(self._device(s.device, s.source), s.metric.name, round(float(w), 4))
                for s, w in est.sources
                if math.isfinite(w)
            ),
            detail=self._detail(est.detail),
            run=self.timebase.run,
            clock=self._clock,
        )
        return OutRecord(Lane.FEATURES, f"estimates/{subject}", payload, est.t_wall)

    def _hits(self, encoded: bytes) -> list[tuple[int, int]]:
        """Where a form of a known identity occurs in ``encoded``: (start, end) of each occurrence."""
        # Text and hex forms in any letter case ("Plant-A/Pump-3" hides "plant-a/pump-3");
        # base64/base32 forms are case-significant and are matched exactly.
        found: list[tuple[int, int]] = []
        lowered = encoded.lower()
        grams = {lowered[i : i + 4] for i in range(len(lowered) - 3)}
        for table, text in ((self._folded, lowered), (self._forms, encoded)):
            # The common case: no form starts anywhere, and the loop below has nothing to do.
            for gram in table.keys() & grams:
                at = lowered.find(gram)
                while at >= 0:
                    found += [(at, at + len(f)) for f in table[gram] if text.startswith(f, at)]
                    at = lowered.find(gram, at + 1)
        return found

    def check(self, encoded: bytes) -> None:
        """Raise AnonymizationError if any known identity appears in the bytes (a topic, a name, any encoding)."""
        hits = self._hits(encoded)
        if hits:
            raise _leak(max(end - start for start, end in hits))

    def check_cbor(self, encoded: bytes) -> None:
        """As :meth:`check` for CBOR, where an identity counts only inside one item, never across two."""
        hits = self._hits(encoded)
        if not hits:
            return
        # A form found in the whole is an identity only inside an item's own bytes (what a reader
        # gets), not a key's tail running into the next item's header byte.
        leaves = cbor_leaves(encoded)
        inside = [end - start for start, end in hits if _within_one((start, end), leaves)]
        if inside:
            raise _leak(max(inside))

    def seal(
        self, build: Callable[[], OutRecord | None], encode: Callable[[Record], bytes]
    ) -> tuple[OutRecord, bytes] | None:
        """Build, encode (CBOR) and check a record; None when there is none to send or (counted) it is not provably anonymous."""
        try:
            rec = build()
            if rec is None:
                return None
            data = encode(rec.payload)
            self.check_cbor(data)
            self.check(rec.topic.encode())
        except AnonymizationError as exc:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("%s (dropped so far: %d)", exc, self.dropped)
            return None
        except Exception:
            # Fail closed on anything unexpected too: drop, count, and show the first trace.
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.exception("anonymizer: record could not be built (dropped so far: %d)", self.dropped)
            return None
        return rec, data
