"""The anonymizer's identity scan per sealed window, against the scan it replaced, in one run.

Every record is scanned for every registered identity's forms (raw, case, compact, hex, base64).
The scan before searched the whole encoded record once per form (``form in data``: thousands of
searches with a fleet's identities) and refused on any hit, even a form spelt across two CBOR
items (the key ``dev`` and the header byte of a pseudonym: ``devp``).  Ours reads the record's
4-byte strings once against an index of the forms' first 4 bytes and confirms a hit inside one
CBOR item (``Anonymizer.check_cbor``).  Both run on the same encoded windows and the same forms in
the same process, rounds alternating, so the ratio holds while the machine's load drifts:

* before: each form searched for in the record, lower-cased for the text and hex forms (the
  code as it was, on the forms ``identity_forms`` and ``text_forms`` give);
* ours: ``Anonymizer.check_cbor``.

Two sets of windows of a fleet's worth of identities: ``clean`` (devices named by MAC address and
serial number, no form anywhere: the usual case) and ``spanning`` (the devices named ``DEV-P``,
``DEV-Q``: a raw hit in every record, which the scan before refused and ours confirms and
passes).  Beside them, the whole seal (build, canonical CBOR, scan) of the same windows, for scale.

A second table does the same for the Sparkplug node's scans: each payload (NBIRTH, DBIRTH, DDATA
of the same windows) as whole bytes (``Anonymizer.check``, before) and field by field
(``Anonymizer.check_within`` with ``codec.field_spans``), and a record's metric names joined with
spaces (before) and one by one (``Anonymizer.check_texts``); *spanning* there is a device with MAC
20:0B:70:00:18:00, the last 6 bytes of every NBIRTH without node metrics.

``--before REV`` prints a third table instead: ``Anonymizer.check_cbor`` of the anonymizer at git
revision ``REV`` (``git show REV:gateway/anonymize.py``) against today's, on the same encoded
windows with the same identities, rounds alternating: *clean* and *spanning* as above, *outside
ASCII* (beds ``Bett-Ä10``..., devices ``Gerät-…``: the case-folded scan of every record holding a
byte outside ASCII) and *short labels* (beds ``B10``..., 3 characters: scanned as words of the
text items).  Two rows more, at a fleet's 2,000 identities of which one is outside ASCII (a subject
``Zimmer-Müller-12``): windows of 24 streams in ``µV``, a letter that folds otherwise (``µ`` to Greek
``μ``), and the same in ``uV``.  ``--cpu`` times them all in CPU time (``time.process_time``), steadier
than the wall clock on a loaded machine.

Run: ``.venv/bin/python tests/benchmarks/bench_anonymize.py [--subjects 40] [--rounds 7] [--before REV [--cpu]]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from revisions import module_at

from gateway.anonymize import Anonymizer, identity_forms, text_forms
from gateway.contracts import StreamFeatures, WindowRecord
from gateway.errors import AnonymizationError
from gateway.records import encode
from gateway.sample import MDC, Stream, industrial_metric
from gateway.uplink.sparkplug import codec

T = TypeVar("T")
WALL0 = 1.7e9
TS_MS = 1_764_870_000_000
# Every NBIRTH without node metrics ends with these 6 bytes (Rebirth = false, seq 0): a device's MAC here.
SPANNING_MAC = "20:0B:70:00:18:00"
PATIENT_METRICS = ("MDC_ECG_HEART_RATE", "MDC_PULS_OXIM_SAT_O2", "MDC_RESP_RATE", "MDC_TEMP_BODY")
#: Subjects of the fleet whose identities (subject, source, device: 3 each) make about 2,000.
FLEET_SUBJECTS = 667
#: A subject outside ASCII: from its registration on, the scan decodes a record with a letter that folds otherwise.
OUTSIDE_ASCII = "Zimmer-Müller-12"
PUMP_METRICS = (
    ("Pump/Motor/Current", "A"),
    ("Pump/Accel", "g"),
    ("Pump/Pressure", "bar"),
    ("Pump/Temp", "Cel"),
)


def _windows(subjects: int, spanning: bool, names: str = "mrn") -> list[WindowRecord]:
    """One 30 s window per subject: half patients (4 streams), half pumps (4 streams).

    ``names``: patients by ``mrn`` (MRN-4800...), ``unicode`` (Bett-Ä10..., devices Gerät-...) or
    ``short`` (B10...).
    """
    out = []
    for i in range(subjects):
        if i % 2 == 0:
            device = "DEV-P" if spanning else f"A4:C1:38:{i // 256:02X}:{i % 256:02X}:7E"
            subject = {"mrn": f"MRN-{4800 + i}", "unicode": f"Bett-Ä{10 + i}", "short": f"B{10 + i}"}[names]
            if names == "unicode":
                device = f"Gerät-{i}"
            streams = [Stream(f"bed{i}-mon", subject, device, MDC[m], rate_hz=1.0) for m in PATIENT_METRICS]
        else:
            device = "DEV-Q" if spanning else f"SN-PLC-{1000 + i}"
            streams = [
                Stream(
                    f"pump{i}-plc", f"line2-m{i}", device, industrial_metric(path, unit), "industrial", 1.0
                )
                for path, unit in PUMP_METRICS
            ]
        feats = {"mean": 97.0 + i % 3, "std": 0.4, "min": 96.0, "max": 98.0, "slope": -0.01}
        sfs = tuple(StreamFeatures(s, 30, 0.0, feats) for s in streams)
        out.append(WindowRecord(streams[0].subject, streams[0].kind, 3, 30.0, WALL0 + 30.0, 30.0, sfs))
    return out


def _channels(count: int, unit: str) -> list[WindowRecord]:
    """``count`` windows of 24 channels in ``unit`` each (an EMG or conductivity rig: about 1.4 KB encoded)."""
    out = []
    for i in range(count):
        streams = [
            Stream(
                f"rig{i}",
                f"line3-r{i}",
                f"SN-RIG-{i}",
                industrial_metric(f"Rig/EMG/electrode-{k:02}", unit),
                "industrial",
                1.0,
            )
            for k in range(24)
        ]
        feats = {"mean": 12.5 + i, "std": 0.4, "min": 11.0, "max": 14.0, "slope": -0.01}
        sfs = tuple(StreamFeatures(s, 30, 0.0, feats) for s in streams)
        out.append(WindowRecord(streams[0].subject, "industrial", 3, 30.0, WALL0 + 30.0, 30.0, sfs))
    return out


def _anonymizer(windows: Sequence[WindowRecord], module: Any = None) -> Anonymizer:
    """An anonymizer (of ``module``, e.g. one at another revision; today's by default) that has seen ``windows``."""
    mod = module or sys.modules[Anonymizer.__module__]
    anon: Anonymizer = mod.Anonymizer(
        mod.Pseudonymizer(b"b" * 32), time_mode="relative", start_wall=WALL0, local_identities=("edgetwin",)
    )
    for w in windows:  # every identity registered, as after the first hop
        anon.window(w)
    return anon


def _identities(windows: Sequence[WindowRecord]) -> set[str]:
    """What the anonymizer registered: the host and gateway names, subjects, sources and devices."""
    out = {socket.gethostname(), "edgetwin"}
    for w in windows:
        out.add(w.subject)
        for sf in w.streams:
            out |= {sf.stream.source, sf.stream.device}
    return out


class ScanBefore:
    """The scan this change replaced: each form searched for in the whole record."""

    def __init__(self, identities: set[str]) -> None:
        self.forms: set[bytes] = set()
        self.folded: set[bytes] = set()
        for identity in identities:
            self.forms |= identity_forms(identity)
            self.folded |= {f for f in text_forms(identity) if len(f) >= 4}

    def check(self, encoded: bytes) -> None:
        """Raise AnonymizationError on any form anywhere in ``encoded``."""
        lowered = encoded.lower()
        for form in self.folded:
            if form in lowered:
                raise AnonymizationError("folded form")
        for form in self.forms:
            if form in encoded:
                raise AnonymizationError("form")


def _per_record_us(
    scan: Callable[[T], None], data: Sequence[T], repeat: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Microseconds per record of ``scan`` over ``data`` (a refusal counts as done), by ``clock``."""
    start = clock()
    for _ in range(repeat):
        for d in data:
            with contextlib.suppress(AnonymizationError):
                scan(d)
    return (clock() - start) / (repeat * len(data)) * 1e6


def _compare(
    before: Callable[[T], None],
    ours: Callable[[T], None],
    items: Sequence[T],
    rounds: int,
    repeat: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[int], float, float]:
    """Items each side refuses, and the median µs per item of each, in alternating rounds."""
    refused = [0, 0]
    for item in items:
        for side, scan in enumerate((before, ours)):
            try:
                scan(item)
            except AnonymizationError:
                refused[side] += 1
    base: list[float] = []
    mine: list[float] = []
    for _ in range(rounds):
        base.append(_per_record_us(before, items, repeat, clock))
        mine.append(_per_record_us(ours, items, repeat, clock))
    return refused, statistics.median(base), statistics.median(mine)


def _sparkplug_payloads(anon: Anonymizer, windows: Sequence[WindowRecord]) -> dict[str, list[bytes]]:
    """What the Sparkplug node scans for these windows: an NBIRTH, and a DBIRTH and a DDATA a subject."""
    out: dict[str, list[bytes]] = {"NBIRTH": [codec.nbirth_head(0, TS_MS).SerializeToString()]}
    for w in windows:
        _, points = codec.points(anon.window(w).payload)
        for kind in ("DBIRTH", "DDATA"):
            payload = codec.new_payload(TS_MS, 1)
            for alias, point in enumerate(points, start=1):
                codec.add_metric(payload, point, alias=alias, ts_ms=TS_MS, birth=kind == "DBIRTH")
            out.setdefault(kind, []).append(payload.SerializeToString())
    return out


def _joined(anon: Anonymizer, texts: Sequence[str]) -> None:
    """The names scan before: a record's names and units joined with spaces, scanned as one text."""
    anon.check(" ".join(texts).encode())


def _sparkplug_rows(subjects: int, rounds: int, repeat: int) -> None:
    """Payloads scanned whole (before) and field by field (ours); a record's names joined and one by one."""
    print()
    print("| Sparkplug | items | bytes | before µs | ours µs | ratio | refused before / ours |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("clean", "spanning"):
        windows = _windows(subjects, False)
        anon = _anonymizer(windows)
        if kind == "spanning":
            anon.register(SPANNING_MAC)
        fields = functools.partial(anon.check_within, items=codec.field_spans)
        cases: list[tuple[str, list[Any], Callable[[Any], None], Callable[[Any], None], float]] = [
            (what, data, anon.check, fields, statistics.median(len(d) for d in data))
            for what, data in _sparkplug_payloads(anon, windows).items()
        ]
        names = [[p.name for p in codec.points(anon.window(w).payload)[1]] for w in windows]
        size = statistics.median(len(" ".join(t)) for t in names)
        cases.append(("names", names, functools.partial(_joined, anon), anon.check_texts, size))
        for what, items, before, ours, size in cases:
            refused, b, o = _compare(before, ours, items, rounds, repeat)
            print(
                f"| {kind}, {what} | {len(items)} | {size:.0f} | {b:.1f} | {o:.1f} | {o / b:.2f}x "
                f"| {refused[0]} / {refused[1]} of {len(items)} |"
            )


def _revision_rows(rev: str, subjects: int, rounds: int, repeat: int, clock: Callable[[], float]) -> None:
    """``check_cbor`` of the anonymizer at ``rev`` against today's, on the same windows, rounds alternating."""
    before_mod = module_at(rev, "gateway/anonymize.py")
    print(f"| windows | identities | bytes | {rev} µs | today µs | ratio | refused {rev} / today |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fleet = _windows(FLEET_SUBJECTS, False)
    cases: list[tuple[str, list[WindowRecord], list[WindowRecord], int]] = [
        (kind, [], _windows(subjects, spanning, names), repeat)
        for kind, spanning, names in (
            ("clean", False, "mrn"),
            ("spanning", True, "mrn"),
            ("outside ASCII", False, "unicode"),
            ("short labels", False, "short"),
        )
    ]
    # A record of 1.7 KB with 2,000 identities takes milliseconds to fold: fewer passes.
    cases += [
        (f"24 streams in {unit}, 1 subject outside ASCII", fleet, _channels(10, unit), max(1, repeat // 10))
        for unit in ("uV", "µV")
    ]
    for kind, known, windows, passes in cases:
        ours = _anonymizer([*known, *windows])
        old = _anonymizer([*known, *windows], before_mod)
        if known:
            for anon in (ours, old):
                anon.register(OUTSIDE_ASCII)
        data = [encode(ours.window(w).payload) for w in windows]
        refused, b, o = _compare(old.check_cbor, ours.check_cbor, data, rounds, passes, clock)
        size = statistics.median(len(d) for d in data)
        identities = len(_identities([*known, *windows])) + bool(known)
        print(
            f"| {kind} | {identities} | {size:.0f} | {b:.1f} | {o:.1f} | {o / b:.2f}x "
            f"| {refused[0]} / {refused[1]} of {len(data)} |"
        )


def main() -> int:
    """Print the table for BENCHMARKS.md."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--before", default=None, help="compare check_cbor with the anonymizer of this git revision"
    )
    parser.add_argument("--cpu", action="store_true", help="time --before's rows in CPU time, not wall-clock")
    args = parser.parse_args()
    print(
        f"anonymizer scan benchmark: {args.subjects} subjects x 4 streams, {args.rounds} alternating rounds"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    if args.before:
        clock = time.process_time if args.cpu else time.perf_counter
        print(f"clock: {'CPU time (time.process_time)' if args.cpu else 'wall (time.perf_counter)'}")
        _revision_rows(args.before, args.subjects, args.rounds, args.repeat, clock)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    print(
        "| windows | identities (forms) | bytes | before µs | ours µs | ratio | refused before / ours | seal µs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("clean", "spanning"):
        windows = _windows(args.subjects, kind == "spanning")
        anon = _anonymizer(windows)
        before = ScanBefore(_identities(windows))
        data = [encode(anon.window(w).payload) for w in windows]
        refused, b, o = _compare(before.check, anon.check_cbor, data, args.rounds, args.repeat)
        seals = max(1, args.repeat // 5)
        start = time.perf_counter()
        for _ in range(seals):
            for w in windows:
                anon.seal(functools.partial(anon.window, w), encode)
        seal_us = (time.perf_counter() - start) / (seals * len(windows)) * 1e6
        n_forms = len(before.forms) + len(before.folded)
        size = statistics.median(len(d) for d in data)
        print(
            f"| {kind} | {len(_identities(windows))} ({n_forms}) | {size:.0f} | {b:.1f} | {o:.1f} | {o / b:.2f}x "
            f"| {refused[0]} / {refused[1]} of {len(data)} | {seal_us:.0f} |"
        )
    _sparkplug_rows(args.subjects, args.rounds, args.repeat)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
