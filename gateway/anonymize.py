"""Fail-closed anonymization: what leaves the gateway carries keyed pseudonyms only.

Identities (subject ids, device MACs and serials, source names, the gateway's name and host name)
exist only on the gateway.  Outgoing records are *built* from an allow-list of fields - metric
names, units, numbers, pseudonyms, short vocabulary tokens - never copied from raw objects, and
every encoded record is then scanned for every identity seen so far, in raw, hex and base64 form.
The scan looks inside each CBOR item (every text and byte string, key or value, and a number's own
bytes), never across two: the key ``dev`` followed by the header byte of a 16-character string
reads ``devp``, which is no device's name.  The same holds for any structured encoding whose items
can be told apart (:meth:`Anonymizer.check_within`: a Sparkplug payload's fields, a record's names
one by one); topics are one text, scanned whole.  A record that fails either step is dropped and
counted, never sent.

Letter case is Unicode case folding (``str.casefold``): the byte scan lower-cases ASCII only, so a
record whose letters fold otherwise than ASCII's (an identity outside ASCII whose start it holds in
some letter case, or a letter such as the sharp s or the Kelvin sign) is also decoded and folded.
A MAC-shaped identity is found in each of its usual spellings.  An identity of 2-3 bytes is found
only as a word of a text item (a CBOR text string, a name, a topic): inside a number's or a byte
string's bytes 3 bytes occur by chance, and inside a longer word they are part of another name.

Pseudonyms are HMAC-SHA-256 under a per-purpose key derived from a site key (32 random bytes
created at first start, mode 0600).  An unkeyed hash of a MAC or serial number can be reversed by
enumeration; a keyed one cannot without the site key.  Rotating the key breaks linkage on purpose.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import hashlib
import hmac
import itertools
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from gateway.config_base import secret_file_problem
from gateway.contracts import Alarm, AlarmKind, Diagnostic, Estimate, Lane, WindowRecord
from gateway.errors import AnonymizationError, ConfigError
from gateway.legend import Legend
from gateway.privatefile import fsync_dir
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
    fsync_dir(path.parent)


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
    # The rotation (outbox set aside, time restarted) goes on only once the new key is the one a
    # power cut leaves.
    fsync_dir(path.parent)
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


#: A MAC address as written: six hex pairs with one separator (or none), or three dotted quads.
_MAC = re.compile(
    r"[0-9a-f]{2}([:\-. ]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}|[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}"
)


def mac_spellings(identity: str) -> set[str]:
    """Every usual spelling of a MAC-shaped identity (lower case), or nothing for any other identity.

    ``AB:CD:EF:01:02:03`` is also written ``ab-cd-ef-01-02-03``, ``abcdef010203``, ``ab cd ef 01 02
    03``, ``ab.cd.ef.01.02.03`` and ``abcd.ef01.0203``: a registered MAC is found in any of them.
    """
    lowered = identity.strip().lower()
    if not _MAC.fullmatch(lowered):
        return set()
    hexits = re.sub(r"[:\-. ]", "", lowered)
    pairs = [hexits[i : i + 2] for i in range(0, 12, 2)]
    quads = [hexits[i : i + 4] for i in range(0, 12, 4)]
    return {sep.join(pairs) for sep in (":", "-", ".", " ", "")} | {".".join(quads)}


def text_forms(identity: str) -> set[bytes]:
    """Lower-cased text and hex forms of an identity, for a case-insensitive scan."""
    compact = re.sub(r"[:\-\s.]", "", identity)
    out = set()
    for form in {identity.lower(), compact.lower(), *mac_spellings(identity)}:
        raw = form.encode()
        out |= {raw, binascii.hexlify(raw)}
    return out


def folded_forms(identity: str) -> set[str]:
    """The identity and its compact form under Unicode case folding (``str.casefold``), for text."""
    compact = re.sub(r"[:\-\s.]", "", identity)
    return {identity.casefold(), compact.casefold()} - {""}


#: Characters outside ASCII whose case folding holds an ASCII letter (the sharp s is "ss", the
#: Kelvin sign "k", a long s "s", the ligature U+FB01 "fi"; Unicode 14): a text holding one may
#: spell an ASCII identity in a letter case the ASCII scan cannot see.
_FOLDS_TO_ASCII = re.compile(
    b"|".join(
        re.escape(chr(c).encode())
        for c in (
            0xDF,
            0x130,
            0x149,
            0x17F,
            0x1F0,
            *range(0x1E96, 0x1E9B),
            0x1E9E,
            0x212A,
            *range(0xFB00, 0xFB07),
        )
    )
)


@functools.cache
def _odd_folds() -> re.Pattern[bytes]:
    """Characters a text may hold that fold to something other than a case of themselves.

    Outside them, a character of a text folds to ``c`` only when it is ``c``, ``c.upper()`` or
    ``c.title()``, which is what :func:`_starts` indexes.  Computed once, for the first record
    outside ASCII once an identity outside ASCII is known (about 35 ms): ``µ``, ``ß``, the final
    sigma, the Kelvin and Ohm signs, ligatures, Greek with iota subscripts...
    """
    odd = []
    for c in range(0x80, 0x1F000):  # no character above folds (Unicode 14)
        x = chr(c)
        f = x.casefold()
        if f != x and (len(f) != 1 or f.isascii() or x not in {f, f.upper(), f.title()}):
            odd.append(re.escape(x.encode()))
    return re.compile(b"|".join(odd))


FoldScope = Literal["none", "anchored", "outside_ascii", "all"]


def fold_scope(encoded: bytes, outside_ascii: bool) -> FoldScope:
    """Which identities' case-folded forms a record needs a Unicode fold for (pure).

    ``all`` when a letter in it folds to an ASCII one (the sharp s, the Kelvin sign, ligatures): it
    may spell any identity in a case the byte scan cannot list.  With identities outside ASCII
    known (``outside_ascii``): ``outside_ascii`` when a letter folds otherwise than to a case of
    itself (``µ`` to Greek mu, which units keep): only those identities, an ASCII one's letters are
    all ASCII bytes the byte scan reads; else ``anchored``: those too, once the start of one occurs.
    """
    if encoded.isascii():
        return "none"
    if _FOLDS_TO_ASCII.search(encoded) is not None:
        return "all"
    if not outside_ascii:
        return "none"
    return "outside_ascii" if _odd_folds().search(encoded) is not None else "anchored"


def _starts(folded: str) -> set[bytes]:
    """The first 4 bytes (ASCII lower-cased, as a record is read) of each letter case of ``folded``'s start."""
    cases = itertools.product(*({c, c.upper(), c.title()} for c in folded[:4]))
    return {"".join(case).encode().lower()[:4] for case in cases}


#: Letters and digits: a short identity counts as a word, bounded by anything else or the text's ends.
_WORD_EDGE = r"(?<![^\W_]){}(?![^\W_])"
#: Identities this short are scanned only as a word of a text (shorter: not at all).
SHORT_CHARS = 2


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


#: Short words of the records' own texts (keys, units, level and estimate names): an identity of
#: 2-3 bytes equal to one would drop every record carrying it, so registering one is warned about.
RECORD_WORDS = frozenset(
    {
        *("cls", "dev", "est", "pri", "run", "sd", "src", "st", "sv", "tm", "win"),
        *("low", "high", "med", "lo", "hi"),
        *("min", "cel", "bar", "kpa", "mm", "hg", "ms"),
        *("hr", "soc", "soh", "rul"),
    }
)


def _leak(size: int) -> AnonymizationError:
    # Never name the identity itself: the log may leave the gateway too.
    return AnonymizationError(
        f"anonymizer: an identity ({size}-byte form) appears in an outgoing record: "
        "record dropped; check metric names and driver metadata for identifiers "
        "('edgetwin check' names the metrics whose names hold one the config names)"
    )


def cbor_leaves(data: bytes, texts: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Where each CBOR item's own bytes lie in ``data`` (strings' content, numbers' argument), in order (pure).

    ``texts``, when given, also receives the spans of the text strings among them.
    """
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
            if texts is not None and major == 3:
                texts.append((i, i + size))
            i += size
        elif i > start and major in (0, 1, 7):  # integers and floats: a MAC passed as a number is caught
            leaves.append((start, i))
        # Arrays, maps and tags: their items follow inline and are read in turn.
    return leaves


S = TypeVar("S", bytes, str)

#: Forms by their first 4 bytes (or characters), then by their length.  Where a record holds the
#: start of some, they are compared once per length (a slice and a set look-up), not once per form:
#: a plant's 333 machines ``line2-m…`` start as every one of its tags ``Line3/…`` does.
FormIndex = dict[S, dict[int, set[S]]]


def index_form(index: FormIndex[S], form: S, *, lower: bool = True) -> None:
    """Add ``form`` to ``index`` under its first 4 bytes or characters (ASCII lower-cased unless not ``lower``) and its length."""
    start = form[:4]
    index.setdefault(start.lower() if lower else start, {}).setdefault(len(form), set()).add(form)


def indexed_hits(index: FormIndex[S], text: S, lowered: S, starts: AbstractSet[S]) -> list[tuple[int, int]]:
    """Each (start, end) in ``text`` where a form of ``index`` occurs (pure).

    ``lowered`` is ``text`` as the index's keys are written (ASCII lower-cased, or ``text`` itself);
    ``starts`` holds every key that may occur in it (a record's 4-byte strings, or all the keys).
    """
    found: list[tuple[int, int]] = []
    # The common case: no form starts anywhere, and the loop below has nothing to do.
    for key in index.keys() & starts:
        by_size = index[key]
        at = lowered.find(key)
        while at >= 0:
            found += [(at, at + size) for size, forms in by_size.items() if text[at : at + size] in forms]
            at = lowered.find(key, at + 1)
    return found


def folded_hits(encoded: bytes, forms: FormIndex[str]) -> list[tuple[int, int]]:
    """Byte spans in ``encoded`` whose text, case-folded, is one of ``forms`` (indexed as written) (pure).

    Bytes that are no UTF-8 stay themselves (never a letter), so a number's bytes fold to nothing.
    """
    text = encoded.decode("utf-8", "surrogateescape")
    folded = text.casefold()
    # One search a start the forms share, not one a form: a fleet's forms share a few dozen.
    spans = indexed_hits(forms, folded, folded, forms.keys())
    if not spans or len(folded) == len(text) == len(encoded):
        return spans  # one byte a character: the folded text's offsets are the bytes'
    # Map the folded text's offsets back to bytes, character by character: only for a hit.
    starts_f: list[int] = []
    starts_b: list[int] = []
    at_f = at_b = 0
    for ch in text:
        starts_f.append(at_f)
        starts_b.append(at_b)
        at_f += len(ch.casefold())
        at_b += 1 if "\udc80" <= ch <= "\udcff" else len(ch.encode())
    starts_b.append(at_b)
    return [
        (starts_b[bisect.bisect_right(starts_f, a) - 1], starts_b[bisect.bisect_left(starts_f, b)])
        for a, b in spans
    ]


def _within_one(span: tuple[int, int], leaves: list[tuple[int, int]]) -> bool:
    """Whether ``span`` lies inside one of ``leaves`` (sorted, not overlapping)."""
    k = bisect.bisect_right(leaves, (span[0], math.inf)) - 1
    return k >= 0 and leaves[k][0] <= span[0] and span[1] <= leaves[k][1]


def cbor_texts(data: bytes) -> list[tuple[int, int]]:
    """Where each CBOR text string's content lies in ``data`` (pure)."""
    texts: list[tuple[int, int]] = []
    cbor_leaves(data, texts)
    return texts


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
        host_name: bool = True,
    ) -> None:
        self._p = pseudonym
        self._time_mode = time_mode
        self._coarsen_s = coarsen_s
        # Record time and run: persisted in the state directory by the runtime; in memory otherwise.
        self.timebase = timebase or TimeBase.ephemeral(start_wall)
        # Which pseudonym is which identity, for technicians on site (local only, never sent).
        self.legend = legend or Legend(None)
        # Every form by its first 4 bytes, lower-cased (forms are 4 bytes or more), and its length: a
        # record is read once for its 4-byte strings instead of once per form (thousands, with a
        # fleet's identities), and where one occurs, compared once per length of the forms it starts.
        self._forms: FormIndex[bytes] = {}
        self._folded: FormIndex[bytes] = {}  # lower-cased text and hex forms, for the case-blind scan
        # Case-folded text forms (str.casefold): of every identity, for a text whose letters fold to
        # ASCII ones; of identities outside ASCII, whose case variants the byte scan cannot list.
        self._casefolded: FormIndex[str] = {}
        self._casefolded_other: FormIndex[str] = {}  # those outside ASCII
        # The first 4 bytes of each letter case of the start of those outside ASCII (read off the
        # record's 4-byte strings with the rest: only a record holding one decodes).
        self._anchored: set[bytes] = set()
        # Identities of SHORT_CHARS to 3 bytes, case-folded: a word of a text item, never raw bytes.
        self._short: set[str] = set()
        self._short_re: re.Pattern[str] | None = None
        self._short_gate: re.Pattern[bytes] | None = None  # the ASCII ones, in a lower-cased record
        self._short_other = False  # one is outside ASCII
        self._registered: set[str] = set()
        self._worded: set[str] = set()  # identities whose short forms are scanned as words
        # Told (identity, log label) the first time a subject or device is seen: the log redactor.
        self.on_identity: Callable[[str, str], None] | None = None
        self.dropped = 0  # records refused because they could not be proven anonymous
        # ``host_name=False``: a probe for named identities only (gateway.held_names).
        for identity in ((socket.gethostname(),) if host_name else ()) + tuple(local_identities):
            self.register(identity)

    def register(self, identity: str, *, words: bool = True) -> None:
        """Add an identity whose every form must never appear in an outgoing record.

        ``words=False`` (a source's name): a form of 2-3 characters is not scanned as a word. A
        source's name is the label a site gives a device (``plc``, ``tep``), often the first word of
        its own metrics' names; the identity it may stand for is its subject, registered as such.
        """
        if identity and words and identity not in self._worded:
            self._worded.add(identity)
            for text in folded_forms(identity):
                if len(text.encode()) < 4 and len(text) >= SHORT_CHARS:
                    self._add_short(text)
        if identity and identity not in self._registered:
            self._registered.add(identity)
            for form in identity_forms(identity):
                # By the lower-cased first bytes: one read of the lower-cased record finds both kinds.
                index_form(self._forms, form)
            for form in text_forms(identity):
                if len(form) >= 4:
                    index_form(self._folded, form)
            for text in folded_forms(identity):
                if len(text.encode()) >= 4:
                    index_form(self._casefolded, text, lower=False)
                    if text.isascii():  # "Straße" folds to "strasse": the byte scan finds that
                        index_form(self._folded, text.encode())
                    else:
                        index_form(self._casefolded_other, text, lower=False)
                        self._anchored |= _starts(text)
            clash = [
                word
                for word in VOCABULARY
                if (len(identity) >= 4 and identity.lower() in word)
                or (
                    words
                    and len(identity.encode()) < 4
                    and identity.casefold() in re.split(r"[^a-z0-9]+", word)
                )
            ]
            if words and len(identity.encode()) < 4 and identity.casefold() in RECORD_WORDS:
                clash.append(identity.casefold())
            if clash:
                log.warning(
                    "anonymizer: the identity %r also occurs in the gateway's own words (%s): every record "
                    "carrying them will be dropped; rename the source, subject or gateway",
                    identity,
                    ", ".join(clash[:3]),
                )

    def _add_short(self, text: str) -> None:
        """Scan records for ``text`` (2-3 characters, case-folded) as a word of a text item."""
        if text in self._short:
            return
        self._short.add(text)
        ascii_ = sorted((t.encode() for t in self._short if t.isascii()), key=len, reverse=True)
        self._short_gate = re.compile(b"|".join(map(re.escape, ascii_))) if ascii_ else None
        self._short_other = not all(map(str.isascii, self._short))
        words = "|".join(_WORD_EDGE.format(re.escape(t)) for t in sorted(self._short, key=len, reverse=True))
        self._short_re = re.compile(words)

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
        """Record time of an instant stamped only with wall time (a diagnostic, made as it is sent)."""
        return self._record_clock(t_wall, self.timebase.site)

    def _t_at(self, t_mono: float) -> float:
        """Record time of a sample's or window's monotonic instant: a wall-clock step cannot move it back."""
        return self._record_clock(t_mono, self.timebase.at)

    def _record_clock(self, instant: float, site: Callable[[float], float]) -> float:
        """``site(instant)`` as seconds since the site origin (coarsened as configured), or exact Unix time."""
        if not math.isfinite(instant):
            raise AnonymizationError("anonymizer: record time is not a finite number: refused")
        t = site(instant)
        if self._time_mode == "relative":
            return round(t, 3)
        if self._time_mode == "coarse":
            return math.floor(t / self._coarsen_s) * self._coarsen_s
        return round(self.timebase.origin + t, 3)

    def log_label(self, purpose: str, identity: str) -> str:
        """How logs name an identity: its purpose and the pseudonym records carry (``subject~k3n...``)."""
        return f"{purpose}~{self._p(purpose, identity)}"

    def source_label(self, name: str) -> str:
        """How a source is named outside the gateway (the downlink's reported state): ``source~<pseudonym>``."""
        self.register(name, words=False)
        self.legend.note("source", name)
        return f"source~{self._p('source', name)}"

    def holds_identity(self, text: str) -> bool:
        """Whether one text (a field of a JSON document) holds any form of a known identity."""
        return bool(self._hits(text.encode())) or self._short_word(text) > 0

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
        self.register(source, words=False)
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
                    flagged=sf.flagged,
                    implausible=sf.implausible,
                )
            )
        payload = FeaturesWindow(
            subject=subject,
            kind=rec.kind,
            t=self._t_at(rec.end_mono),
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
            t=self._t_at(alarm.t_mono),
            dev=None if stream is None else self._device(stream.device, stream.source),
            # A device alarm names the device, not one of its streams.
            metric=None if stream is None or alarm.kind in _DEVICE_KINDS else stream.metric.name,
            detail=self._alarm_detail(alarm),
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

    def _alarm_detail(self, alarm: Alarm) -> dict[str, float | str]:
        """An alarm's detail; one about a node with no stream names it by its pseudonym (``node``)."""
        detail = self._detail(alarm.detail)
        node = alarm.node
        if node is not None:
            self.legend.note("node", node.identity, node.source)
            detail["node"] = self._p("node", node.identity)
        return detail

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
            t=self._t_at(est.t_mono),
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
        return self._read(encoded)[0]

    def _read(self, encoded: bytes) -> tuple[list[tuple[int, int]], bytes, bool]:
        """:meth:`_hits`, the lower-cased bytes, and whether a letter in them folds to an ASCII one."""
        # Text and hex forms in any letter case ("Plant-A/Pump-3" hides "plant-a/pump-3");
        # base64/base32 forms are case-significant and are matched exactly.
        found: list[tuple[int, int]] = []
        lowered = encoded.lower()
        grams = {lowered[i : i + 4] for i in range(len(lowered) - 3)}
        # Letter case outside ASCII: a text folded as Unicode does.  Only a record holding a letter
        # that folds otherwise than to its own lower case, or the start of an identity outside ASCII
        # in any letter case, decodes, and is searched for the forms that letter may spell.
        scope = fold_scope(encoded, bool(self._anchored))
        if scope == "all":
            found += folded_hits(encoded, self._casefolded)
        elif scope == "outside_ascii" or (scope == "anchored" and not self._anchored.isdisjoint(grams)):
            # Only identities outside ASCII can occur folded: an ASCII one's letters are ASCII bytes here.
            found += folded_hits(encoded, self._casefolded_other)
        found += indexed_hits(self._folded, lowered, lowered, grams)
        found += indexed_hits(self._forms, encoded, lowered, grams)
        return found, lowered, scope == "all"

    def _short_word(self, text: str) -> int:
        """The length of a short identity standing as a word in ``text`` (any letter case), else 0."""
        if self._short_re is None:
            return 0
        m = self._short_re.search(text.casefold())
        return 0 if m is None else len(m.group().encode())

    def _short_texts(
        self,
        encoded: bytes,
        lowered: bytes,
        to_ascii: bool,
        texts: Callable[[bytes], list[tuple[int, int]]],
    ) -> None:
        """Raise when a short identity stands as a word in one of the text items of ``encoded``."""
        if self._short_re is None:
            return
        # Read the items only when a short identity's letters occur (any letter case: the ASCII
        # ones in the lower-cased bytes), and decode only the texts holding them; every text when
        # a short identity is outside ASCII or the record holds a letter that folds to an ASCII one
        # (one folding outside ASCII, such as µ, cannot make an ASCII identity's letters).
        every = to_ascii or (self._short_other and not encoded.isascii())
        # Each match's first and last byte: one starting at an item's header byte may swallow the start
        # of one inside the text, but then ends inside that text.
        found = (
            []
            if self._short_gate is None
            else [at for m in self._short_gate.finditer(lowered) for at in (m.start(), m.end() - 1)]
        )
        if not (found or every):
            return
        spans = texts(encoded)
        if not every:
            starts = [a for a, _ in spans]
            picked = {
                k for at in found if (k := bisect.bisect_right(starts, at) - 1) >= 0 and at < spans[k][1]
            }
            spans = [spans[k] for k in sorted(picked)]
        for a, b in spans:
            size = self._short_word(encoded[a:b].decode("utf-8", "surrogateescape"))
            if size:
                raise _leak(size)

    def check(self, encoded: bytes) -> None:
        """Raise AnonymizationError if any known identity appears in the bytes (a topic, a name, any encoding)."""
        hits, lowered, to_ascii = self._read(encoded)
        if hits:
            raise _leak(max(end - start for start, end in hits))
        self._short_texts(encoded, lowered, to_ascii, lambda data: [(0, len(data))])

    def check_within(self, encoded: bytes, items: Callable[[bytes], list[tuple[int, int]]]) -> None:
        """As :meth:`check` for a structured encoding, where an identity counts only inside one of its items.

        ``items`` gives where each item's own bytes lie in ``encoded`` (sorted, not overlapping;
        raising AnonymizationError when it cannot tell); it is read only when a form is found.
        Identities of 2-3 bytes are not looked for: which items are text is not known here (a
        payload's names go through :meth:`check_texts`).
        """
        self._confirm(encoded, self._read(encoded)[0], items)

    def _confirm(
        self, encoded: bytes, hits: list[tuple[int, int]], items: Callable[[bytes], list[tuple[int, int]]]
    ) -> None:
        """Raise for the first of ``hits`` inside one item's own bytes."""
        if not hits:
            return
        # A form found in the whole is an identity only inside an item's own bytes (what a reader
        # gets), not a key's tail running into the next item's header byte or a field's tag.
        leaves = items(encoded)
        inside = [end - start for start, end in hits if _within_one((start, end), leaves)]
        if inside:
            raise _leak(max(inside))

    def check_cbor(self, encoded: bytes) -> None:
        """As :meth:`check` for CBOR, where an identity counts only inside one item, never across two."""
        hits, lowered, to_ascii = self._read(encoded)
        texts: list[tuple[int, int]] | None = None
        if hits:
            texts = []
            self._confirm(encoded, hits, functools.partial(cbor_leaves, texts=texts))
        self._short_texts(encoded, lowered, to_ascii, cbor_texts if texts is None else lambda _: texts)

    def check_texts(self, texts: Iterable[str]) -> None:
        """As :meth:`check` for several separate texts (names, units): a form spelt across two is none."""
        parts = [t.encode() for t in texts]
        spans, at = [], 0
        for part in parts:
            spans.append((at, at + len(part)))
            at += len(part) + 1
        # One scan over them all, read once as a record is; a hit counts only inside one text.
        joined = b"\0".join(parts)
        hits, lowered, to_ascii = self._read(joined)
        self._confirm(joined, hits, lambda _: spans)
        self._short_texts(joined, lowered, to_ascii, lambda _: spans)

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
